"""Several images anywhere (issue 34): comparison records from the scene generator, each image its own span of
image tokens wherever its placeholder stands, the model's image limit, and chat with several images."""
import json

import pytest
import torch

from vlmkit.data import compare
from vlmkit.data.dataset import ConversationDataset, collate
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord, VlmkitError


def test_comparison_records_are_seeded_and_their_answers_follow_the_scenes(tmp_path, monkeypatch):
    from PIL import Image

    from vlmkit.data.scenes import COLORS

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path))
    for k in (2, 3):
        records = compare.builtin_records(f"compare:{k}:n40")
        assert records == compare.builtin_records(f"compare:{k}:n40")  # read back from the cache, the same
        assert {r["kind"] for r in records} == {"count", "colour"} and all(len(r["image"]) == k for r in records)
        answers = {r["conversations"][1]["value"] for r in records}
        assert answers >= ({"yes", "no", "image 1", "image 2"} if k == 2 else {"image 1", "image 2", "image 3"})
        for record in records:
            assert record["conversations"][0]["value"].count("<image>") == k
            pixels = [Image.open(path).convert("RGB") for path in record["image"]]
            colours = [{c for c, rgb in COLORS.items() if rgb in {p for _, p in image.getcolors(4096)}}
                       for image in pixels]
            answer = record["conversations"][1]["value"]
            if record["kind"] == "colour":  # one shape a scene: its colour is the one non-white colour
                assert all(len(c) == 1 for c in colours)
                seen = [c.pop() for c in colours]
                if k == 2:
                    assert (answer == "yes") == (seen[0] == seen[1])
                else:
                    odd = int(answer.split()[1]) - 1
                    assert len({seen[j] for j in range(3) if j != odd}) == 1 and seen[odd] not in seen[:odd] + \
                        seen[odd + 1:]
    test = compare.builtin_records("compare:2:test:n10")
    assert not set(test[0]["image"]) & set(records[0]["image"])
    with pytest.raises(Exception, match="K 2 or 3"):
        compare.parse_source_name("compare:5")


@pytest.fixture(scope="module")
def llava(backbones):
    from vlmkit.archs import from_name
    from vlmkit.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": backbones["llm"]})
    return VisionLanguageModel.from_config(config, verbose=False).eval()


def _dataset(model, records, mode="train", max_images=None):
    return ConversationDataset(records, model.tokenizer, get_template(model.config.template), model.image_transform,
                               num_image_tokens=model.num_image_tokens, mode=mode, verbose=False,
                               max_images=max_images if max_images is not None else model.config.max_images)


def test_each_image_fills_its_own_span_wherever_it_stands(llava, image_files):
    model = llava
    record = {"id": "r", "image": image_files[:3], "conversations": [
        {"from": "human", "value": "Is <image> redder than <image>?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "no"}]}
    dataset = _dataset(model, [record])
    batch = collate(dataset.examples, model.tokenizer.pad_token_id)
    pixels = dataset.pixels(batch.image_indices)
    with torch.no_grad():
        embeds, mask = model.embed(batch.input_ids, batch.image_counts, pixels)
        each = model.connector(model.encode_images(pixels))  # (3, N, D)
    n = model.num_image_tokens
    spans = mask[0].nonzero().flatten()
    assert len(spans) == 3 * n
    starts = [int(spans[j * n]) for j in range(3)]
    assert all(int(spans[j * n + n - 1]) == starts[j] + n - 1 for j in range(3))  # each image one contiguous span
    assert starts[1] > starts[0] + n and starts[2] > starts[1] + n  # text between them: placeholders in place
    for j in range(3):
        assert torch.allclose(embeds[0, starts[j]:starts[j] + n], each[j])
    # swapping two images swaps exactly their spans
    with torch.no_grad():
        swapped, _ = model.embed(batch.input_ids, batch.image_counts, pixels[[1, 0, 2]])
    assert torch.equal(swapped[0, starts[0]:starts[0] + n], embeds[0, starts[1]:starts[1] + n])
    assert torch.equal(swapped[0, starts[2]:starts[2] + n], embeds[0, starts[2]:starts[2] + n])


def test_the_image_limit_is_the_models(llava, image_files):
    record = {"id": "three", "image": image_files[:3], "conversations": [
        {"from": "human", "value": "<image><image><image> which?"}, {"from": "gpt", "value": "image 1"}]}
    with pytest.raises(BadRecord, match="has 3 images; this model takes at most 2"):
        _dataset(llava, [record], max_images=2)
    assert len(_dataset(llava, [record]).examples) == 1  # max_images 4 by default


def test_cogvlm_says_it_takes_one_image(backbones, image_files):
    from vlmkit.archs import from_name
    from vlmkit.infer.chat import answer
    from vlmkit.model.vlm import VisionLanguageModel

    config = from_name("cogvlm", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": backbones["llm"]})
    model = VisionLanguageModel.from_config(config, verbose=False)
    with pytest.raises(VlmkitError, match="at most 1 .*CogVLM as released takes one image"):
        answer(model, [{"role": "user", "content": "<image> <image> same?"}], image_files[:2])
    with pytest.raises(BadRecord, match="has 2 images; this model takes at most 1"):
        _dataset(model, [{"id": "two", "image": image_files[:2], "conversations": [
            {"from": "human", "value": "<image> <image> same?"}, {"from": "gpt", "value": "no"}]}])


def test_chat_takes_several_images_from_the_command_line(llava, tmp_path, image_files, capsys):
    from vlmkit.cli import main
    from vlmkit.infer.chat import answer, first_user_turn
    from vlmkit.infer.generate import GenerationConfig

    assert first_user_turn("same colour?", 2) == "Image 1: <image>\nImage 2: <image>\nsame colour?"
    assert first_user_turn("is <image> like <image>?", 2) == "is <image> like <image>?"
    with pytest.raises(VlmkitError, match="1 <image> placeholder"):
        first_user_turn("is <image> red?", 2)
    llava.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "m"), "--image", image_files[0], "--image", image_files[1],
                 "--max-new-tokens", "4", "Are", "the", "shapes", "the", "same", "colour?"]) == 0
    said = capsys.readouterr().out.strip()
    expected = answer(llava, [{"role": "user", "content": first_user_turn("Are the shapes the same colour?", 2)}],
                      image_files[:2], GenerationConfig(max_new_tokens=4))
    assert said == expected
    # and a LLaVA JSON with several images evaluates
    data = tmp_path / "two.json"
    data.write_text(json.dumps([{"id": f"q{i}", "image": image_files[:2], "conversations": [
        {"from": "human", "value": first_user_turn("same?", 2)}, {"from": "gpt", "value": "no"}]} for i in range(3)]))
    assert main(["eval", str(tmp_path / "m"), "--data", str(data)]) == 0
    assert "accuracy" in capsys.readouterr().out
