"""BLIP-2's querying transformer (Q-Former): learned queries read the image through cross-attention.

Built on transformers' `Blip2QFormerModel` (BERT layers; cross-attention to the image every
`cross_attention_frequency` layers from layer 0; the queries' own feed-forward weights, the text's beside them)
and named as `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` name it, so their checkpoints map
key for key:

    query_tokens          (1, num_queries, H) learned queries
    qformer               Blip2QFormerModel; its `layernorm` also normalises the text embeddings (HF's layout)
    language_projection   Linear(H -> LLM width): the query outputs become soft visual prompts (stage 2)

and, when the text side exists (`text_input`, stage 1), what LAVIS's `Blip2Qformer` adds for its three losses:

    embeddings            word + position embeddings of the Q-Former's BERT vocabulary
    vision_projection / text_projection   Linear(H -> proj_dim) for ITC, `temp` its learned temperature
    itm_head              Linear(H -> 2) on each query output, averaged, for ITM
    itg_head              BERT's LM prediction head (dense, activation, LayerNorm, decoder tied to the word
                          embeddings) for ITG

The self-attention mask decides which objective a forward serves (`vlmkit.train.blip2` builds them): queries and
text apart (ITC), text causal after all queries (ITG), everything bidirectional (ITM).
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import Connector, register
from vlmkit.errors import ConfigError

DEFAULT_WIDTH = 768  # bert-base


def qformer_config(config: ConnectorConfig, vision_hidden: int, vocab_size: int = 30522, pad_token_id: int = 0,
                   bert=None):
    """The `Blip2QFormerConfig` for a connector config: sizes from a BERT config when one is named."""
    from transformers import Blip2QFormerConfig

    width = config.embed_dim or (bert.hidden_size if bert is not None else DEFAULT_WIDTH)
    if bert is not None and width != bert.hidden_size:
        raise ConfigError(f"connector.embed_dim={config.embed_dim} but the BERT at connector.name_or_path "
                          f"({config.name_or_path}) is {bert.hidden_size} wide")
    heads = config.num_heads or (bert.num_attention_heads if bert is not None else max(1, width // 64))
    if width % heads:
        raise ConfigError(f"connector.num_heads={heads} does not divide the Q-Former's width {width}")
    if config.cross_attention_frequency < 1:
        raise ConfigError(f"connector.cross_attention_frequency={config.cross_attention_frequency}: must be >= 1")
    layers = config.num_layers if bert is None or config.num_layers else bert.num_hidden_layers
    extra = {}
    if bert is not None:
        extra = dict(hidden_act=bert.hidden_act, layer_norm_eps=bert.layer_norm_eps,
                     max_position_embeddings=bert.max_position_embeddings,
                     hidden_dropout_prob=bert.hidden_dropout_prob,
                     attention_probs_dropout_prob=bert.attention_probs_dropout_prob)
    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=config.intermediate_size or (bert.intermediate_size if bert is not None else 4 * width),
        cross_attention_frequency=config.cross_attention_frequency, encoder_hidden_size=vision_hidden,
        use_qformer_text_input=config.text_input, pad_token_id=pad_token_id, **extra)


class ITGHead(nn.Module):
    """BERT's LM prediction head (LAVIS's `cls.predictions`); the decoder shares the word embeddings' weight."""

    def __init__(self, hf_config, word_embeddings: nn.Embedding):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hf_config.hidden_size, hf_config.hidden_size)
        self.act = ACT2FN[hf_config.hidden_act]
        self.LayerNorm = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(hf_config.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: not a submodule, so its weight is saved once

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.LayerNorm(self.act(self.dense(hidden)))
        return nn.functional.linear(hidden, self.word_embeddings[0].weight, self.bias)


@register("qformer")
class QFormer(Connector):
    """BLIP-2: `num_queries` learned queries through a BERT with cross-attention, then a Linear to the LLM."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int,
                 vocab_size: int = 30522, pad_token_id: int = 0, bert_config=None):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        from transformers import Blip2QFormerModel
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if config.num_queries < 1:
            raise ConfigError(f"connector.num_queries={config.num_queries}: the Q-Former needs at least one query")
        if bert_config is None and config.name_or_path:
            from transformers import AutoConfig

            bert_config = AutoConfig.from_pretrained(config.name_or_path)
        if bert_config is not None:
            vocab_size, pad_token_id = bert_config.vocab_size, bert_config.pad_token_id or 0
        self.hf_config = hf = qformer_config(config, vision_hidden, vocab_size, pad_token_id, bert_config)
        hf._attn_implementation = "sdpa"
        self.hidden_size = hf.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, hf.hidden_size))
        nn.init.normal_(self.query_tokens, std=hf.initializer_range)  # LAVIS: normal_(0, initializer_range)
        self.qformer = Blip2QFormerModel(hf)
        self.language_projection = nn.Linear(hf.hidden_size, llm_hidden)
        if config.text_input:
            self.embeddings = Blip2TextEmbeddings(hf)
            self.vision_projection = nn.Linear(hf.hidden_size, config.proj_dim)
            self.text_projection = nn.Linear(hf.hidden_size, config.proj_dim)
            self.itm_head = nn.Linear(hf.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itg_head = ITGHead(hf, self.embeddings.word_embeddings)
            for module in (self.embeddings, self.vision_projection, self.text_projection, self.itm_head,
                           self.itg_head):
                module.apply(self._init_weights)
        self.num_output_tokens = config.num_queries

    def _init_weights(self, module: nn.Module) -> None:  # BERT's: normal(0, 0.02), zero biases, unit LayerNorms
        std = self.hf_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        return self.config.num_queries  # whatever the image's token count: cross-attention reads them all

    @property
    def has_text(self) -> bool:
        return hasattr(self, "embeddings")

    # -- the three ways the Q-Former runs ------------------------------------------------------------------
    def query_outputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """The queries after reading the image: (B, num_queries, H)."""
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_features).last_hidden_state

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text alone, no queries and no image (ITC's text side): (B, T, H)."""
        self._need_text()
        return self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                            attention_mask=attention_mask).last_hidden_state

    def joint_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_features: torch.Tensor) -> torch.Tensor:
        """Queries then text in one sequence, reading the image; `attention_mask` (B, Q+T, Q+T) says who sees
        whom (ITG's multimodal causal mask, ITM's bidirectional one): (B, Q+T, H)."""
        self._need_text()
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = attention_mask[:, None].to(torch.bool) if attention_mask.dim() == 3 else attention_mask
        return self.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                            encoder_hidden_states=image_features).last_hidden_state

    def _need_text(self) -> None:
        if not self.has_text:
            raise ConfigError("this Q-Former has no text side (connector.text_input is False: it was imported from a "
                              "Blip2ForConditionalGeneration checkpoint, which has none); stage-1 objectives need it")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        query = self.query_outputs(features)
        return self.language_projection(query.to(self.language_projection.weight.dtype))
