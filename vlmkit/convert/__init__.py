"""Checkpoints in other formats, in and out.

- `from_hf` / `to_hf`: Hugging Face's `LlavaForConditionalGeneration` directories (`hf_llava.py`).
- `from_llava_original`: the original LLaVA repository's `LlavaLlamaForCausalLM` checkpoints.
- `read_state_dict`: safetensors weights, pickles only on request (`weights.py`).
"""
from vlmkit.convert.hf_llava import from_hf, to_hf
from vlmkit.convert.llava_original import from_llava_original
from vlmkit.convert.weights import read_state_dict

__all__ = ["from_hf", "to_hf", "from_llava_original", "read_state_dict"]
