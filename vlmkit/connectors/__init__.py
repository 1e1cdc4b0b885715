"""Connectors map vision features (B, N, D_vision) to LLM embeddings (B, M, D_llm), registered by name.

A connector also says how many tokens it emits for N input tokens (`num_output_tokens`), so the renderer
can expand each `<image>` into exactly that many placeholders. Token-merging and query-based connectors
(MiniGPT-v2's 4-to-1 concat, Qwen-VL's resampler, BLIP-2's Q-Former) register here with their own counts.

`concat4` (MiniGPT-v2) lives here; `resampler` (Qwen-VL) in `resampler.py`, registered on import below.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vlmkit.config import ConnectorConfig, typed_connector_config
from vlmkit.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls
    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def connector_class(config: ConnectorConfig):
    if config.type not in _REGISTRY:
        raise ConfigError(f"unknown connector {config.type!r}; registered: {', '.join(names())}")
    return _REGISTRY[config.type]


def build_connector(config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int) -> nn.Module:
    return connector_class(config)(config, vision_hidden=vision_hidden, llm_hidden=llm_hidden,
                                   num_vision_tokens=num_vision_tokens)


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__()
        self.config = typed_connector_config(config)  # its own fields only (vlmkit.config.connector_config_class)
        self.vision_hidden, self.llm_hidden = vision_hidden, llm_hidden
        self.num_output_tokens = num_vision_tokens

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        """How many tokens this connector emits for `num_vision_tokens` input tokens (ConfigError if it can't
        take that many)."""
        return num_vision_tokens

    @classmethod
    def resolve_pretrained(cls, config: ConnectorConfig):
        """Before building: read what the connector starts from (a BERT for the Q-Former); returns the config with
        the sizes that implies and a handle for `init_pretrained` (None: nothing to load)."""
        return config, None

    def init_pretrained(self, pretrained) -> None:
        """After building a new model (not when loading a checkpoint): load the weights `resolve_pretrained` found."""

    def set_input_tokens(self, num_vision_tokens: int) -> None:
        """The encoder's grid changed (a stage's image_size): emit as many tokens as the new grid gives."""
        self.num_output_tokens = self.output_tokens_for(num_vision_tokens)


@register("linear")
class LinearConnector(Connector):
    """LLaVA: one Linear per token."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        self.proj = nn.Linear(vision_hidden, llm_hidden, bias=config.bias)

    def forward(self, features):
        return self.proj(features)


@register("mlp2x_gelu")
class MLPConnector(Connector):
    """LLaVA-1.5: Linear -> GELU -> Linear per token (names as in transformers' LlavaMultiModalProjector)."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        from transformers.activations import ACT2FN  # start-up: transformers, 0.76 s

        if config.act not in ACT2FN:
            raise ConfigError(f"connector.act={config.act!r} is not an activation transformers knows "
                              f"(e.g. {', '.join(sorted(ACT2FN)[:8])}…)")
        self.linear_1 = nn.Linear(vision_hidden, llm_hidden, bias=config.bias)
        self.act = ACT2FN[config.act]
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden, bias=config.bias)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


@register("concat4")
class ConcatConnector(Connector):
    """MiniGPT-v2: every `merge` consecutive tokens concatenated along the channels, then one Linear.

    As the released `encode_img` does with `view(bs, n/4, 4*d)`: output token j is tokens merge*j ..
    merge*j+merge-1 side by side, in the encoder's row-major order, so a 1 x merge strip of one row (not a 2 x 2
    block). `llama_proj` is the released Linear's name, so MiniGPT-v2's checkpoint keys map one to one."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        if config.merge < 1:
            raise ConfigError(f"connector.merge={config.merge}: concat4 needs at least 1 token per group")
        self.merge = config.merge
        self._check_count(num_vision_tokens)
        self.llama_proj = nn.Linear(vision_hidden * self.merge, llm_hidden, bias=config.bias)
        self.num_output_tokens = num_vision_tokens // self.merge

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        self._check_count(num_vision_tokens)
        return num_vision_tokens // self.merge

    def _check_count(self, num_tokens: int) -> None:
        if num_tokens % self.merge:
            raise ConfigError(f"connector concat4 merges {self.merge} tokens into one, but the vision encoder gives "
                              f"{num_tokens} tokens, not a multiple of {self.merge} (change connector.merge, the "
                              f"image size, or vision.select: a kept CLS token adds one)")

    def forward(self, features):
        batch, num_tokens, hidden = features.shape
        self._check_count(num_tokens)
        return self.llama_proj(features.reshape(batch, num_tokens // self.merge, hidden * self.merge))


@register("glu")
class GLUAdapter(Connector):
    """CogVLM's adapter, as released (`GLU` in its EVA2-CLIP model): Linear without bias -> LayerNorm -> GELU ->
    SwiGLU (`gate_proj`, `dense_h_to_4h`, `dense_4h_to_h`, no biases) at the LLM's width, then a learned begin-image
    and end-image vector (`boi`, `eoi`, zero at initialisation) around the image's tokens: two more tokens than
    the tower gives. The SwiGLU's inner width is `connector.intermediate_size` (0 = 8/3 of the LLM's, Llama's
    ratio, rounded up to a multiple of 8)."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        inner = config.intermediate_size or -(-8 * llm_hidden // 3 // 8) * 8
        self.linear_proj = nn.Linear(vision_hidden, llm_hidden, bias=False)
        self.norm1 = nn.LayerNorm(llm_hidden)
        self.act1 = nn.GELU()
        self.gate_proj = nn.Linear(llm_hidden, inner, bias=False)
        self.dense_h_to_4h = nn.Linear(llm_hidden, inner, bias=False)
        self.dense_4h_to_h = nn.Linear(inner, llm_hidden, bias=False)
        self.boi = nn.Parameter(torch.zeros(1, 1, llm_hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, llm_hidden))
        self.num_output_tokens = num_vision_tokens + 2

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        return num_vision_tokens + 2

    def forward(self, features):
        x = self.act1(self.norm1(self.linear_proj(features)))
        x = self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))
        batch = x.shape[0]
        return torch.cat([self.boi.expand(batch, -1, -1).to(x.dtype), x, self.eoi.expand(batch, -1, -1).to(x.dtype)],
                         dim=1)


from vlmkit.connectors import resampler  # noqa: F401,E402  (registers 'resampler')
from vlmkit.connectors import qformer  # noqa: F401,E402  (registers 'qformer')
