"""The Q-Former connector and BLIP-2's stage-1 objectives: masks, the single-pass ITC, losses against references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import build_connector
from vlmkit.objectives import blip2


def qformer(queries=3, text_input=True, frequency=2, layers=2):
    torch.manual_seed(0)
    config = ConnectorConfig(type="qformer", num_queries=queries, embed_dim=32, num_layers=layers, num_heads=4,
                             proj_dim=16, cross_attention_frequency=frequency, text_input=text_input)
    connector = build_connector(config, 24, 40, 9, ).eval()
    with torch.no_grad():
        for param in connector.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return connector


def test_masks_say_exactly_who_sees_whom():
    Q = 2
    text_mask = torch.tensor([[1, 1, 1, 0]])  # three text tokens then padding
    q, t = [0, 1], [2, 3, 4]
    pad = 5
    itc = blip2.attention_mask("itc", Q, text_mask)[0]
    itg = blip2.attention_mask("itg", Q, text_mask)[0]
    itm = blip2.attention_mask("itm", Q, text_mask)[0]
    assert itc.shape == (6, 6)
    for row in range(6):
        for col in range(6):
            seen = col != pad
            assert itm[row, col] == seen, (row, col)
            assert itc[row, col] == (seen and ((row in q) == (col in q))), (row, col)
            if row in q:
                expected = col in q
            else:
                expected = col in q or (col in t and col <= row)
            assert itg[row, col] == (seen and expected), (row, col)


def test_queries_read_the_image_and_text_does_not():
    connector = qformer()
    image = torch.randn(2, 9, 24)
    ids = torch.randint(5, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        out = connector.joint_outputs(ids, blip2.attention_mask("itc", 3, mask), image)
        # the unimodal pass equals the query-only and the text-only passes
        torch.testing.assert_close(out[:, :3], connector.query_outputs(image), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 3:], connector.text_outputs(ids, mask), atol=1e-5, rtol=1e-5)
        # ITG: changing a text token changes nothing before it, the queries included
        other = ids.clone()
        other[:, 2] = 7
        a = connector.joint_outputs(ids, blip2.attention_mask("itg", 3, mask), image)
        b = connector.joint_outputs(other, blip2.attention_mask("itg", 3, mask), image)
        torch.testing.assert_close(a[:, :3 + 2], b[:, :3 + 2])
        assert (a[:, 3 + 2:] - b[:, 3 + 2:]).abs().amax() > 1e-4
        # ITM: the queries see the text, so a text change reaches them
        a = connector.joint_outputs(ids, blip2.attention_mask("itm", 3, mask), image)
        b = connector.joint_outputs(other, blip2.attention_mask("itm", 3, mask), image)
        assert (a[:, :3] - b[:, :3]).abs().amax() > 1e-4
        # another image changes the queries' outputs
        assert (connector.query_outputs(image) - connector.query_outputs(image.flip(0))).abs().amax() > 1e-4


def test_cross_attention_every_other_layer_from_layer_zero():
    connector = qformer(layers=4, frequency=2)
    assert [layer.has_cross_attention for layer in connector.qformer.encoder.layer] == [True, False, True, False]
    assert qformer(layers=3, frequency=1).qformer.encoder.layer[2].has_cross_attention


def test_forward_projects_the_query_outputs_to_the_llm_width():
    connector = qformer()
    image = torch.randn(2, 9, 24)
    with torch.no_grad():
        out = connector(image)
        torch.testing.assert_close(out, connector.language_projection(connector.query_outputs(image)))
    assert out.shape == (2, 3, 40) and connector.num_output_tokens == 3
    assert connector.output_tokens_for(49) == 3  # any grid


def test_losses_against_a_direct_computation():
    connector = qformer()
    image = torch.randn(4, 9, 24)
    ids = torch.randint(6, 100, (4, 6))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    ids[3] = ids[0]  # a repeated caption: positive of both images 0 and 3
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = blip2.qformer_losses(connector, image, ids, mask, dec_token_id=1, pad_token_id=0, generator=generator)
        query = F.normalize(connector.vision_projection(connector.query_outputs(image)), dim=-1)
        text = F.normalize(connector.text_projection(connector.text_outputs(ids, mask)[:, 0]), dim=-1)
        sim = torch.einsum("iqp,tp->itq", query, text).amax(-1) / connector.temp
        targets = torch.eye(4)
        targets[0, 3] = targets[3, 0] = 1
        targets = targets / targets.sum(1, keepdim=True)
        itc = (F.cross_entropy(sim, targets, label_smoothing=0.1) + F.cross_entropy(sim.T, targets,
                                                                                    label_smoothing=0.1)) / 2
        torch.testing.assert_close(losses["itc"], itc, atol=1e-5, rtol=1e-5)

        dec = ids.clone()
        dec[:, 0] = 1
        out = connector.joint_outputs(dec, blip2.attention_mask("itg", 3, mask), image)
        logits = connector.itg_head(out[:, 3:-1])
        labels = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=0.1)
        torch.testing.assert_close(losses["itg"], itg, atol=1e-5, rtol=1e-5)
        assert 0 < float(losses["itm"]) < 5
        torch.testing.assert_close(losses["loss"], losses["itc"] + losses["itm"] + losses["itg"])


def test_itm_negatives_are_never_the_same_text():
    connector = qformer()
    image = torch.randn(3, 9, 24)
    ids = torch.randint(6, 100, (3, 5))
    ids[1] = ids[0]  # 0 and 1 share a caption: the only negative of either is pair 2
    mask = torch.ones(3, 5, dtype=torch.long)
    calls = []
    original = connector.joint_outputs

    def spy(input_ids, attention_mask, image_features):
        calls.append((input_ids.clone(), image_features.clone()))
        return original(input_ids, attention_mask, image_features)
    connector.joint_outputs = spy
    with torch.no_grad():
        blip2.qformer_losses(connector, image, ids, mask, 1, 0, torch.Generator().manual_seed(3))
    itm_ids, itm_images = calls[1]
    assert itm_ids.shape[0] == 9
    negative_texts, negative_images = itm_ids[6:], itm_images[3:6]
    for i in range(3):
        assert not torch.equal(negative_texts[i], ids[i])
        assert not torch.equal(negative_images[i], image[i]) and (i == 2 or torch.equal(negative_images[i], image[2]))


def test_a_qformer_without_text_side_says_so():
    from vlmkit.errors import ConfigError

    connector = qformer(text_input=False)
    assert not connector.has_text and not hasattr(connector, "itm_head")
    with pytest.raises(ConfigError, match="no text side"):
        connector.text_outputs(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
