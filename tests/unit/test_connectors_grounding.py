"""The token-merging and query connectors of the grounding presets: MiniGPT-v2's concat4, Qwen-VL's resampler.

The references below are transcriptions of the released code (MiniGPT-v2's `encode_img`, MAE's
`get_2d_sincos_pos_embed`, Qwen-VL's `get_abs_pos` and `Resampler.forward` + `ln_post` / `x @ proj`), run with
the module's own weights."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import build_connector, names
from vlmkit.connectors.resampler import resize_table, sincos_2d
from vlmkit.errors import ConfigError


def test_both_are_registered():
    assert {"concat4", "resampler"} <= set(names())


# -- concat4 (MiniGPT-v2) -----------------------------------------------------------------------------------
def _identity_concat(num_tokens: int, hidden: int, merge: int = 4):
    """A concat4 whose Linear is the identity, so its output is the merged features themselves."""
    connector = build_connector(ConnectorConfig(type="concat4", merge=merge), hidden, merge * hidden, num_tokens)
    with torch.no_grad():
        connector.llama_proj.weight.copy_(torch.eye(merge * hidden))
        connector.llama_proj.bias.zero_()
    return connector


def test_concat4_merges_consecutive_tokens_in_row_major_order():
    batch, num_tokens, hidden = 2, 16, 3  # a 4 x 4 grid of patches
    index = torch.arange(num_tokens, dtype=torch.float32)
    # channel c of token i in image b holds 1000*b + 10*i + c: every value says where it came from
    features = (1000 * torch.arange(batch).view(batch, 1, 1) + 10 * index.view(1, num_tokens, 1)
                + torch.arange(hidden).view(1, 1, hidden)).float()
    connector = _identity_concat(num_tokens, hidden)
    out = connector(features)
    assert connector.num_output_tokens == num_tokens // 4 and out.shape == (batch, num_tokens // 4, 4 * hidden)
    for b in range(batch):
        for j in range(num_tokens // 4):
            torch.testing.assert_close(out[b, j], torch.cat([features[b, 4 * j + k] for k in range(4)]))
    # output token 0 is the first row's strip (patches 0, 1, 2, 3), not the 2 x 2 block (patches 0, 1, 4, 5)
    tokens_in_first = (out[0, 0].view(4, hidden)[:, 0] / 10).round().long().tolist()
    assert tokens_in_first == [0, 1, 2, 3]


def test_concat4_equals_the_released_encode_img():
    torch.manual_seed(0)
    connector = build_connector(ConnectorConfig(type="concat4"), vision_hidden=6, llm_hidden=10, num_vision_tokens=8)
    image_embeds = torch.randn(3, 8, 6)
    # minigpt4/models/minigpt_v2.py, encode_img (after dropping CLS):
    bs, pn, hs = image_embeds.shape
    merged = image_embeds.view(bs, int(pn / 4), int(hs * 4))
    expected = torch.nn.functional.linear(merged, connector.llama_proj.weight, connector.llama_proj.bias)
    torch.testing.assert_close(connector(image_embeds), expected)
    assert connector.llama_proj.in_features == 24 and connector.llama_proj.bias is not None


def test_concat_merge_is_configurable_and_checked():
    connector = _identity_concat(num_tokens=6, hidden=2, merge=2)
    features = torch.randn(1, 6, 2)
    assert connector.num_output_tokens == 3
    torch.testing.assert_close(connector(features), features.reshape(1, 3, 4))
    with pytest.raises(ConfigError, match="merges 4 tokens.*gives 10 tokens, not a multiple of 4"):
        build_connector(ConnectorConfig(type="concat4"), 4, 8, num_vision_tokens=10)
    with pytest.raises(ConfigError, match="gives 7 tokens"):
        _identity_concat(num_tokens=6, hidden=2, merge=2)(torch.randn(1, 7, 2))
    with pytest.raises(ConfigError, match="merge=0"):
        build_connector(ConnectorConfig(type="concat4", merge=0), 4, 8, 8)
    assert build_connector(ConnectorConfig(type="concat4", bias=False), 4, 8, 8).llama_proj.bias is None


# -- resampler (Qwen-VL) ------------------------------------------------------------------------------------
def _mae_get_2d_sincos_pos_embed(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py, as Qwen-VL's visual.py copies it (numpy, float32)."""
    def from_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = from_1d(embed_dim // 2, grid[0])
    emb_w = from_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _released_get_abs_pos(abs_pos, tgt_size):
    src_size = int(math.sqrt(abs_pos.size(0)))
    tgt_size = int(math.sqrt(tgt_size))
    dtype = abs_pos.dtype
    if src_size != tgt_size:
        return F.interpolate(
            abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2),
            size=(tgt_size, tgt_size), mode="bicubic", align_corners=False,
        ).permute(0, 2, 3, 1).flatten(0, 2).to(dtype=dtype)
    return abs_pos


def _released_forward(m, x):
    """Qwen-VL visual.py: Resampler.forward, then VisionTransformer's `x = self.ln_post(x); x = x @ self.proj`."""
    pos_embed = _released_get_abs_pos(m.pos_embed, x.size(1))
    x = m.kv_proj(x)
    x = m.ln_kv(x).permute(1, 0, 2)
    N = x.shape[1]
    q = m.ln_q(m.query)
    out = m.attn(q.unsqueeze(1).repeat(1, N, 1) + m.pos_embed.unsqueeze(1), x + pos_embed.unsqueeze(1), x,
                 attn_mask=None)[0]
    x = out.permute(1, 0, 2)
    x = m.ln_post(x)
    return x @ m.proj


def _resampler(vision_hidden=12, llm_hidden=20, num_vision_tokens=64, **kw):
    torch.manual_seed(0)
    config = ConnectorConfig(type="resampler", **{"num_queries": 16, "embed_dim": 16, "num_heads": 4, **kw})
    return build_connector(config, vision_hidden, llm_hidden, num_vision_tokens)


def test_resampler_shapes_and_parts():
    connector = _resampler()
    out = connector(torch.randn(3, 64, 12))
    assert out.shape == (3, 16, 20) and connector.num_output_tokens == 16
    assert connector.kv_proj.weight.shape == (16, 12) and connector.kv_proj.bias is None
    assert connector.proj.shape == (16, 20) and connector.attn.num_heads == 4
    # defaults: the LLM's width, Qwen-VL's embed_dim // 128 heads (at least one)
    default = build_connector(ConnectorConfig(type="resampler", num_queries=4), 12, 256, 16)
    assert default.embed_dim == 256 and default.num_heads == 2 and default.proj.shape == (256, 256)
    assert build_connector(ConnectorConfig(type="resampler", num_queries=4), 12, 64, 16).num_heads == 1
    # equal widths: kv_proj is the identity, as in the released code
    assert isinstance(_resampler(vision_hidden=16).kv_proj, torch.nn.Identity)


def test_sincos_table_by_hand_and_against_mae():
    connector = _resampler(num_queries=4, embed_dim=8, num_heads=2, num_vision_tokens=4)
    # width 8: a quarter of 2 frequencies, 1 and 1/10000^(1/2) = 1/100; the column first, then the row
    expected = []
    for row in range(2):
        for col in range(2):
            expected.append([math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                             math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)])
    torch.testing.assert_close(connector.pos_embed, torch.tensor(expected))
    torch.testing.assert_close(sincos_2d(32, 5), torch.from_numpy(_mae_get_2d_sincos_pos_embed(32, 5)).float())


def test_table_is_a_buffer_not_a_parameter():
    connector = _resampler()
    assert "pos_embed" in dict(connector.named_buffers()) and "pos_embed" in connector.state_dict()
    assert "pos_embed" not in dict(connector.named_parameters())
    assert {"query", "kv_proj.weight", "proj", "ln_q.weight", "ln_kv.weight", "ln_post.weight",
            "attn.in_proj_weight"} <= set(dict(connector.named_parameters()))


@pytest.mark.parametrize("num_tokens", [16, 64, 4])  # the query grid, finer (8 x 8), coarser (2 x 2)
def test_resampler_equals_the_released_forward(num_tokens):
    connector = _resampler(num_vision_tokens=num_tokens)
    with torch.no_grad():  # non-trivial norms so a swapped ln_q / ln_kv / ln_post would show
        for norm in (connector.ln_q, connector.ln_kv, connector.ln_post):
            norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    features = torch.randn(3, num_tokens, 12)
    torch.testing.assert_close(connector(features), _released_forward(connector, features))
    # each image is resampled on its own: batch and sequence axes are not mixed up by the permutes
    torch.testing.assert_close(connector(features[1:2]), connector(features)[1:2])


def test_key_positions_are_interpolated_only_when_the_grid_differs():
    connector = _resampler()
    table = connector.pos_embed
    assert resize_table(table, 4) is table  # 4 x 4 queries, 4 x 4 patches: the table itself
    resized = resize_table(table, 8)
    grid = table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1).reshape(64, -1))
    assert resized.shape == (64, 16) and not torch.allclose(resized[:16], table)


@pytest.mark.parametrize("num_tokens", [16, 64])
def test_keys_get_positions_values_do_not(num_tokens):
    connector = _resampler(num_vision_tokens=num_tokens)
    seen = {}

    def capture(module, args, kwargs):
        seen["query"], seen["key"], seen["value"] = args[:3]

    connector.attn.register_forward_pre_hook(capture, with_kwargs=True)
    features = torch.randn(2, num_tokens, 12)
    connector(features)
    kv = connector.ln_kv(connector.kv_proj(features)).permute(1, 0, 2)  # (N, B, E)
    key_pos = resize_table(connector.pos_embed, math.isqrt(num_tokens))
    torch.testing.assert_close(seen["value"], kv)
    torch.testing.assert_close(seen["key"], kv + key_pos.unsqueeze(1))
    queries = connector.ln_q(connector.query) + connector.pos_embed
    torch.testing.assert_close(seen["query"], queries.unsqueeze(1).expand(-1, 2, -1))


def test_gradients_reach_queries_kv_proj_and_proj():
    connector = _resampler()
    connector(torch.randn(2, 64, 12)).square().sum().backward()
    for name in ("query", "kv_proj.weight", "proj", "attn.in_proj_weight", "ln_q.weight"):
        grad = dict(connector.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert connector.pos_embed.grad is None and not connector.pos_embed.requires_grad


def test_encoder_resolution_may_change_between_calls():
    connector = _resampler(num_vision_tokens=16)  # e.g. Qwen-VL's stage 1 at 224 px, then 448 px
    for num_tokens in (16, 64, 36):
        features = torch.randn(2, num_tokens, 12)
        out = connector(features)
        assert out.shape == (2, 16, 20)
        torch.testing.assert_close(out, _released_forward(connector, features))


def test_resampler_initialisation_follows_the_released_code():
    torch.manual_seed(0)
    connector = build_connector(ConnectorConfig(type="resampler", num_queries=64, embed_dim=64, num_heads=4),
                                96, 64, 64)
    assert abs(connector.query.std().item() - 0.02) < 0.003
    assert abs(connector.kv_proj.weight.std().item() - 0.02) < 0.003
    assert abs(connector.attn.out_proj.weight.std().item() - 0.02) < 0.004  # an nn.Linear: reached by _init_weights
    assert torch.all(connector.attn.out_proj.bias == 0) and torch.all(connector.attn.in_proj_bias == 0)
    assert abs(connector.proj.std().item() - 64 ** -0.5) < 0.02
    for norm in (connector.ln_q, connector.ln_kv, connector.ln_post):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0) and norm.eps == 1e-6


def test_resampler_config_errors():
    with pytest.raises(ConfigError, match="num_queries must be a square.*got 10"):
        build_connector(ConnectorConfig(type="resampler", num_queries=10), 8, 16, 16)
    with pytest.raises(ConfigError, match="token count.*square.*got 17"):
        build_connector(ConnectorConfig(type="resampler", num_queries=4), 8, 16, 17)  # CLS kept
    with pytest.raises(ConfigError, match="num_heads=3 does not divide"):
        build_connector(ConnectorConfig(type="resampler", num_queries=4, num_heads=3), 8, 16, 16)
    with pytest.raises(ConfigError, match="divisible by 4, got 18"):
        build_connector(ConnectorConfig(type="resampler", num_queries=4, num_heads=2, embed_dim=18), 8, 16, 16)
    with pytest.raises(ConfigError, match="number of vision tokens must be a square.*got 15"):
        _resampler()(torch.randn(1, 15, 12))


def test_new_fields_leave_existing_connectors_alone():
    config = ConnectorConfig()
    assert (config.type, config.act, config.bias) == ("mlp2x_gelu", "gelu", True)
    assert (config.merge, config.num_queries, config.num_heads, config.embed_dim) == (4, 256, 0, 0)
    mlp = build_connector(ConnectorConfig(type="mlp2x_gelu", merge=2, num_queries=9), 4, 6, 5)
    assert mlp.num_output_tokens == 5 and {n for n, _ in mlp.named_parameters()} == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
