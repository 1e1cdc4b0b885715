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
