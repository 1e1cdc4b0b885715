"""Checkpoints in other formats, in and out.

- `from_hf`: a Hugging Face directory or hub id, by its model_type: `LlavaForConditionalGeneration`
  (`hf_llava.py`) or `Blip2ForConditionalGeneration` (`hf_blip2.py`); `to_hf`: back, to
  the format of the model's architecture.
- `from_llava_original`: the original LLaVA repository's `LlavaLlamaForCausalLM` checkpoints.
- `from_minigpt4`: a MiniGPT-4 projection file on a BLIP-2 checkpoint and its LLM (`minigpt4.py`).
- `read_state_dict`: safetensors weights, pickles only on request (`weights.py`).
"""
from vlmkit.convert import hf_blip2, hf_llava
from vlmkit.convert.llava_original import from_llava_original
from vlmkit.convert.minigpt4 import from_minigpt4
from vlmkit.model.weights import read_state_dict

_IMPORTERS = {"llava": hf_llava.from_hf, "blip-2": hf_blip2.from_hf}


def from_hf(src, **kwargs):
    """A vlmkit model from a Hugging Face checkpoint of a format vlmkit imports (see `_IMPORTERS`)."""
    from transformers import AutoConfig  # start-up: transformers, 0.76 s

    model_type = AutoConfig.from_pretrained(str(src)).model_type
    importer = _IMPORTERS.get(model_type, hf_llava.from_hf)  # the LLaVA importer names what else it knows
    return importer(src, **kwargs)


def to_hf(model, out):
    """Write a vlmkit model in the Hugging Face format of its architecture: BLIP-2 for a Q-Former, else LLaVA."""
    if model.config.connector.type == "qformer":
        return hf_blip2.to_hf(model, out)
    return hf_llava.to_hf(model, out)


__all__ = ["from_hf", "to_hf", "from_llava_original", "from_minigpt4", "read_state_dict"]
