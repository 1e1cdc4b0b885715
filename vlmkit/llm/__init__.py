"""Language models: any `transformers` causal LM behind one interface, and encoder-decoder LMs (Flan-T5) beside it.

`LanguageModel(inputs_embeds, attention_mask, position_ids, past_key_values) -> (logits, cache)`.
The assembly only needs the input embedding table, a forward on embeddings and a KV cache; an LLM with
visual-expert layers (CogVLM) takes the same call plus the image-token mask.

An encoder-decoder LM (`is_encoder_decoder`, BLIP-2's Flan-T5) is read through `encode` (the prompt, image
tokens spliced in, as embeddings) and `decode` (decoder tokens against the encoder's states, with its own KV
cache); `forward` is not used for it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from vlmkit.llm.visual_expert import Route, add_visual_experts


def sample_positions(attention_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None,
                     prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids (B, L) of a batch, each token numbered as it would be in its sample alone.

    Without `sequence_ids`: the real tokens of each row counted from 0 (right padding for training, left padding
    for generation; a padding position gets its neighbour's number, which nothing reads). With `sequence_ids`
    (packed rows: the index of each token's sample in its row, -1 on padding, each sample contiguous): every
    sample restarts at 0; with `prefix_lengths` (a shared-prefix row: sample 0 is the prefix), every later sample
    continues from the row's prefix length, as it would follow the prefix alone. Padding is 0 there."""
    if sequence_ids is None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    length = sequence_ids.shape[1]
    index = torch.arange(length, device=sequence_ids.device).expand_as(sequence_ids)
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    positions = index - start
    if prefix_lengths is not None:
        prefix = prefix_lengths.to(sequence_ids.device)[:, None].expand_as(sequence_ids)
        positions = positions + torch.where((sequence_ids > 0) & (prefix > 0), prefix, torch.zeros_like(prefix))
    return positions.masked_fill(sequence_ids < 0, 0)


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers causal LM, or a peft model wrapping one during a LoRA stage
        self.lora = None    # the LoRAConfig of attached adapters (vlmkit.llm.lora)
        self.experts = None  # CogVLM's visual experts, one per decoder layer (vlmkit.llm.visual_expert)
        self.route = Route()
        # transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model itself, without a peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "LanguageModel":
        from transformers import AutoConfig  # start-up: transformers, 0.76 s

        kwargs.setdefault("attn_implementation", "sdpa")
        hf = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        return cls(_auto_class(hf).from_pretrained(path, **kwargs))

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> "LanguageModel":
        from transformers import AutoConfig  # start-up: transformers, 0.76 s

        hf = AutoConfig.for_model(**hf_config)
        return cls(_auto_class(hf).from_config(hf, attn_implementation="sdpa"))

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def is_encoder_decoder(self) -> bool:
        """An encoder-decoder LM (T5): the prompt goes to its encoder, the answer comes from its decoder."""
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def decoder_start_token_id(self) -> int:
        start = getattr(self.config, "decoder_start_token_id", None)
        return int(start if start is not None else self.config.pad_token_id)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states (B, S, D) for a prompt given as embeddings."""
        encoder = self.causal_lm.get_encoder()
        return encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor,
               decoder_mask=None, past_key_values=None, use_cache: bool = False):
        """Decoder logits (B, T, V) for `decoder_input_ids` (the start token, then the answer so far) reading the
        encoder's states; returns (logits, cache). With a cache, only the new decoder tokens are passed."""
        from transformers.modeling_outputs import BaseModelOutput  # start-up: transformers, 0.76 s

        outputs = self.causal_lm(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                                 attention_mask=encoder_mask, decoder_input_ids=decoder_input_ids,
                                 decoder_attention_mask=decoder_mask, use_cache=use_cache,
                                 **{self._cache_kwarg: past_key_values})
        return outputs.logits, getattr(outputs, self._cache_kwarg, None)

    @property
    def hidden_size(self) -> int:
        return self.causal_lm.get_input_embeddings().embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_input_embeddings()(input_ids)

    def add_visual_experts(self) -> None:
        """CogVLM: give every decoder layer a visual expert (vlmkit.llm.visual_expert), initialised as copies of
        the layer's own weights; the tokens `image_token_mask` marks use it from then on."""
        if self.experts is None:
            self.experts = add_visual_experts(self.causal_lm, self.route)

    def _routing(self, image_token_mask) -> None:
        """The tokens that take the visual experts in the forward about to run (none without experts)."""
        if self.experts is not None:
            self.route.set(image_token_mask.bool() if image_token_mask is not None else None)

    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None, image_token_mask=None):
        """Last hidden states (B, T, D), without the LM head: the loss applies the head only where needed.
        `image_token_mask` (B, T): the tokens routed to the visual experts, when the LLM has them."""
        self._routing(image_token_mask)
        decoder = self.causal_lm.get_decoder()
        outputs = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
        return outputs.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, image_token_mask=None, logits_to_keep: int = 0):
        self._routing(image_token_mask)
        outputs = self.causal_lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, logits_to_keep=logits_to_keep,
                             **{self._cache_kwarg: past_key_values})
        return outputs.logits, getattr(outputs, self._cache_kwarg, None)


def _auto_class(hf_config):
    """The transformers auto class for an LM config: seq-to-seq for encoder-decoders (T5), causal otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM  # start-up: transformers, 0.76 s

    return AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
