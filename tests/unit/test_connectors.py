import pytest
import torch

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import build_connector, names
from vlmkit.errors import ConfigError


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_connectors_map_each_token(name):
    connector = build_connector(ConnectorConfig(type=name), vision_hidden=12, llm_hidden=20, num_vision_tokens=9)
    features = torch.randn(3, 9, 12)
    out = connector(features)
    assert out.shape == (3, 9, 20) and connector.num_output_tokens == 9
    # per-token: permuting tokens permutes outputs
    perm = torch.randperm(9)
    torch.testing.assert_close(connector(features[:, perm]), out[:, perm])


def test_mlp_is_linear_gelu_linear():
    connector = build_connector(ConnectorConfig(type="mlp2x_gelu"), 4, 6, 1)
    x = torch.randn(2, 1, 4)
    expected = connector.linear_2(torch.nn.functional.gelu(connector.linear_1(x)))
    torch.testing.assert_close(connector(x), expected)


def test_mlp_honours_activation_and_bias():
    connector = build_connector(ConnectorConfig(type="mlp2x_gelu", act="silu", bias=False), 4, 6, 1)
    assert connector.linear_1.bias is None and connector.linear_2.bias is None
    x = torch.randn(2, 1, 4)
    torch.testing.assert_close(connector(x), connector.linear_2(torch.nn.functional.silu(connector.linear_1(x))))
    with pytest.raises(ConfigError, match="not an activation"):
        build_connector(ConnectorConfig(type="mlp2x_gelu", act="nope"), 4, 6, 1)


def test_unknown_connector_lists_the_registered_ones():
    assert {"linear", "mlp2x_gelu"} <= set(names())
    with pytest.raises(ConfigError, match="unknown connector 'perceiver'.*linear"):
        build_connector(ConnectorConfig(type="perceiver"), 4, 4, 1)


def test_each_connector_holds_its_own_typed_config():
    """A connector's config is its type's own dataclass: `type` and the ConnectorConfig fields that type reads
    (defaults and help from ConnectorConfig, written once); another connector's field is not there to read."""
    import dataclasses

    from vlmkit.config import connector_config_class, connector_fields

    sizes = {"linear": {}, "mlp2x_gelu": {}, "concat4": {}, "resampler": {"num_queries": 4}}
    for name, extra in sizes.items():
        connector = build_connector(ConnectorConfig(type=name, merge=2, act="relu", **extra), 8, 16, 16)
        cls = connector_config_class(name)
        assert type(connector.config) is cls and cls.__name__.endswith("Config")
        assert [f.name for f in dataclasses.fields(cls)] == connector_fields(name)
        assert connector.config.type == name
        assert not hasattr(connector.config, "name_or_path")  # the Q-Former's, read by no other connector
    assert build_connector(ConnectorConfig(type="concat4", merge=2), 8, 16, 16).config.merge == 2
    assert build_connector(ConnectorConfig(type="mlp2x_gelu", act="relu"), 8, 16, 16).config.act == "relu"
    assert not hasattr(build_connector(ConnectorConfig(type="resampler", num_queries=4), 8, 16, 16).config, "merge")
    assert connector_config_class("qformer")().num_layers == ConnectorConfig().num_layers
