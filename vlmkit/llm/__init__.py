"""Language models: any `transformers` causal LM behind one interface.

`LanguageModel(inputs_embeds, attention_mask, position_ids, past_key_values) -> (logits, cache)`.
The assembly only needs the input embedding table, a forward on embeddings and a KV cache; an LLM with
visual-expert layers (CogVLM) takes the same call plus the image-token mask.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers causal LM, or a peft model wrapping one during a LoRA stage
        self.lora = None    # the LoRAConfig of attached adapters (vlmkit.llm.lora)
        # transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model itself, without a peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "LanguageModel":
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("attn_implementation", "sdpa")
        return cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> "LanguageModel":
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = AutoConfig.for_model(**hf_config)
        return cls(AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa"))

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_input_embeddings()(input_ids)

    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None, image_token_mask=None):
        """Last hidden states (B, T, D), without the LM head: the loss applies the head only where needed."""
        decoder = self.causal_lm.get_decoder()
        outputs = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
        return outputs.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, image_token_mask=None, logits_to_keep: int = 0):
        outputs = self.causal_lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, logits_to_keep=logits_to_keep,
                             **{self._cache_kwarg: past_key_values})
        return outputs.logits, getattr(outputs, self._cache_kwarg, None)
