"""Qwen-VL's resampler: a fixed number of learned queries cross-attend once to the image's patch features.

Follows the `Resampler` of the `visual.py` published with Qwen-VL (and the `ln_post` / `proj` that follow it in
that file's `VisionTransformer`), step by step:

    keys/values = ln_kv(kv_proj(features))                      kv_proj: Linear without bias, Identity if equal widths
    queries     = ln_q(query) + pos_embed                       pos_embed: fixed 2-D sin-cos table, side x side
    keys       += pos_embed bicubically resized to the encoder's grid (values get no position)
    out         = MultiheadAttention(queries, keys, values)     (L, N, E) layout, as the released code permutes
    tokens      = ln_post(out) @ proj                           proj: a bias-free (embed_dim, LLM width) matrix

The encoder's grid may change between calls (Qwen-VL trains at 224 px, then 448 px): the key positions are
resized to whatever square grid arrives, and the output is always `num_queries` tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import Connector, register
from vlmkit.errors import ConfigError

_LN_EPS = 1e-6  # Qwen-VL: norm_layer = partial(nn.LayerNorm, eps=1e-6) for ln_q, ln_kv and ln_post


def sincos_2d(embed_dim: int, side: int) -> torch.Tensor:
    """MAE's `get_2d_sincos_pos_embed(embed_dim, side)`: (side*side, embed_dim), position p = row * side + col.

    MAE builds `meshgrid(grid_w, grid_h)` ("here w goes first"), so the first half of the channels encodes the
    column and the second half the row; each half is sin of embed_dim/4 frequencies 1/10000^(i/(embed_dim/4))
    followed by their cos."""
    if embed_dim % 4:
        raise ConfigError(f"a 2-D sin-cos table needs a width divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def one_axis(position: torch.Tensor) -> torch.Tensor:
        angle = position.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


def resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """Qwen-VL's `get_abs_pos`: a (s*s, C) table bicubically resized to (side*side, C); unchanged when s == side."""
    source = math.isqrt(table.shape[0])
    if source == side:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def _square_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(f"connector resampler: {what} must be a square number (a side x side grid), got "
                          f"{num_tokens}")
    return side


@register("resampler")
class Resampler(Connector):
    """Qwen-VL: `num_queries` learned queries, one cross-attention to the features, then ln_post and `proj`."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        if config.num_queries < 1:
            raise ConfigError(f"connector.num_queries={config.num_queries}: the resampler needs at least one query")
        self.grid_side = _square_side(config.num_queries, "connector.num_queries")
        _square_side(num_vision_tokens, "the vision encoder's token count (a kept CLS token makes it 1 + side^2: "
                                        "use vision.select='patch')")
        self.embed_dim = embed_dim = config.embed_dim or llm_hidden
        # Qwen-VL builds the resampler with num_heads = output_dim // 128 (32 heads at 4096)
        self.num_heads = num_heads = config.num_heads or max(1, embed_dim // 128)
        if embed_dim % num_heads:
            raise ConfigError(f"connector.num_heads={num_heads} does not divide the resampler's width {embed_dim}")

        # fixed, not learned: a buffer (Qwen-VL keeps it as a Parameter with requires_grad False; same key)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid_side))
        self.query = nn.Parameter(torch.zeros(config.num_queries, embed_dim))
        trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(vision_hidden, embed_dim, bias=False) if vision_hidden != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.apply(self._init_weights)  # reaches kv_proj and attn.out_proj (an nn.Linear), not attn.in_proj_weight
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, llm_hidden))
        self.num_output_tokens = config.num_queries

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        _square_side(num_vision_tokens, "the number of vision tokens")
        return self.config.num_queries  # whatever the grid: the key positions are resized to it

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = features.shape
        key_pos = resize_table(self.pos_embed, _square_side(num_tokens, "the number of vision tokens"))
        kv = self.ln_kv(self.kv_proj(features)).permute(1, 0, 2)  # (N, B, E): MultiheadAttention's (L, N, E)
        queries = self.ln_q(self.query).unsqueeze(1).repeat(1, batch, 1)  # the released `_repeat`
        out = self.attn(queries + self.pos_embed.unsqueeze(1), kv + key_pos.to(kv.dtype).unsqueeze(1), kv,
                        need_weights=False)[0]  # the weights are not used; skipping them lets torch fuse the kernel
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj
