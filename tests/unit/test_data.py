import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.dataset import ConversationDataset, collate, length_grouped_batches, load_llava_json
from vlmkit.data.images import ImageLimits, ImageTransform, load_image
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord, VlmkitError


def good(i, image="img0.png"):
    return {"id": f"ok{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}]}


@pytest.fixture
def bad_records(tmp_path, image_files):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "empty.png").write_bytes(b"")
    return [
        ({"id": "missing", "image": "nope.png", "conversations": good(0)["conversations"]}, "missing_image"),
        ({"id": "corrupt", "image": "corrupt.png", "conversations": good(0)["conversations"]}, "corrupt_image"),
        ({"id": "empty", "image": "empty.png", "conversations": good(0)["conversations"]}, "corrupt_image"),
        ({"id": "two-tags", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image><image>\nhm"}, {"from": "gpt", "value": "x"}]}, "image_count"),
        ({"id": "no-turns", "image": "img0.png"}, "schema"),
        ({"id": "same-twice", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\na"}, {"from": "human", "value": "b"}]}, "turns"),
        ({"id": "empty-answer", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\na"}, {"from": "gpt", "value": ""}]}, "turns"),
    ]


def dataset(model, records, folder, **kw):
    return ConversationDataset(records, model.tokenizer, get_template("vicuna_v1"), model.image_transform,
                               num_image_tokens=model.num_image_tokens, max_length=256, image_folder=folder,
                               source="data.json", verbose=False, **kw)


def test_each_bad_record_stops_with_its_id_and_reason(make_model, bad_records, tmp_path):
    model = make_model()
    for record, kind in bad_records:
        with pytest.raises(BadRecord) as info:
            dataset(model, [good(1), record], tmp_path)
        assert info.value.kind == kind
        assert f"record {record['id']!r}" in str(info.value) and str(info.value).startswith("data.json: ")
        assert "\n" not in str(info.value)


def test_skip_bad_counts_by_reason(make_model, bad_records, tmp_path):
    model = make_model()
    ds = dataset(model, [good(1)] + [r for r, _ in bad_records] + [good(2, "img1.png")], tmp_path, skip_bad=True)
    assert [e.record_id for e in ds.examples] == ["ok1", "ok2"]
    assert ds.skipped.counts == {"missing_image": 1, "corrupt_image": 2, "image_count": 1, "schema": 1, "turns": 2}
    assert ds.skipped.summary().startswith("skipped 7 bad records")
    assert ds.pixel_values.shape[0] == 2  # each image decoded once


def test_prompt_mode_holds_out_the_answer_and_adds_the_prompt(make_model, tmp_path, image_files):
    model = make_model()
    ds = dataset(model, [good(1)], tmp_path, mode="prompt", answer_prompt="Answer in one word.")
    example = ds[0]
    assert example.answer == "red"
    text = model.tokenizer.decode(example.input_ids)
    assert text.endswith("what color?\nAnswer in one word. ASSISTANT:") and "red" not in text


def test_collate_pads_right_and_masks(make_model, tmp_path, image_files):
    model = make_model()
    records = [good(1), {"id": "t", "conversations": [{"from": "human", "value": "a longer text-only question"},
                                                      {"from": "gpt", "value": "ok"}]}]
    ds = dataset(model, records, tmp_path)
    batch = collate(ds.examples, model.tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in ds.examples]
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.image_counts == [1, 0] and batch.image_indices.tolist() == [0]
    short = lengths.index(min(lengths))
    assert (batch.labels[short, min(lengths):] == -100).all()


def test_length_grouped_batches_cover_everything_once():
    lengths = [5, 100, 6, 98, 50, 99, 51, 97]
    batches = length_grouped_batches(lengths, batch_size=2, seed=1, group=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches == length_grouped_batches(lengths, batch_size=2, seed=1, group=4)
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 2 for b in batches)


def test_llava_json_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,}]')
    with pytest.raises(VlmkitError, match=r"broken.json: malformed JSON at line 1"):
        load_llava_json(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(VlmkitError, match="latin.json: not UTF-8"):
        load_llava_json(latin)
    good_file = tmp_path / "good.json"
    good_file.write_text(json.dumps([good(1)]))
    assert load_llava_json(good_file)[0]["id"] == "ok1"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 Mpixel declared, a few KB on disk
    with pytest.raises(BadRecord, match="declares 400,000,000 pixels") as info:
        load_image(path, "bomb")
    assert info.value.kind == "image_too_large"
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(BadRecord, match="100x100 pixels, more than the limit of 5,000"):
        load_image(small, "small", ImageLimits(max_pixels=5000))


def test_transform_matches_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    processor.save_pretrained(tmp_path)
    transform = ImageTransform.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    expected = torch.tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(transform(image), expected, atol=2e-2, rtol=0)


def test_pad_to_square_keeps_the_whole_image(tmp_path):
    transform = ImageTransform(size=8, crop=(8, 8), pad_to_square=True)
    image = Image.new("RGB", (16, 8), (255, 0, 0))
    out = transform(image)
    assert out.shape == (3, 8, 8)
    red = (1 - transform.mean[0]) / transform.std[0]
    assert torch.allclose(out[0, 4], torch.full((8,), red), atol=1e-4)  # the middle row is the image
    assert not torch.allclose(out[0, 0], torch.full((8,), red), atol=1e-2)  # the top row is padding
