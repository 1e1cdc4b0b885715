"""Generated glyphs (a second visual domain): deterministic, split-separated, answers that match the drawing;
and evaluation asks a user's JSON as it was trained (no preset answer prompt appended)."""
import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data import glyphs
from vlmkit.data.scenes import COLORS
from vlmkit.errors import ConfigError


def test_glyphs_are_deterministic_and_the_splits_differ(tmp_path):
    a = glyphs.write_glyphs(tmp_path / "a", 40, "train", seed=3)
    b = glyphs.write_glyphs(tmp_path / "b", 40, "train", seed=3)
    assert a.read_bytes() == b.read_bytes()
    assert all((tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
               for r in json.loads(a.read_text()))
    train = [g for _, g, _ in glyphs.glyph_images(200, "train")]
    test = [g for _, g, _ in glyphs.glyph_images(200, "test")]
    assert train != test and len(set(train) & set(test)) < 5  # separate streams (a coincidence is possible)
    assert [g for _, g, _ in glyphs.glyph_images(200, "train", seed=1)] != train


def test_records_answer_what_is_drawn(tmp_path):
    path = glyphs.write_glyphs(tmp_path, 60, "test")
    records = json.loads(path.read_text())
    assert {r["kind"] for r in records} == set(glyphs.QUESTIONS)
    drawn = {index: (glyph, image) for index, glyph, image in glyphs.glyph_images(60, "test")}
    for index, record in enumerate(records):
        glyph, image = drawn[index]
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n") and "digit" in human["value"] or record["kind"] == "texture"
        assert gpt["value"] == glyph.answer(record["kind"]) and glyph.char in glyphs.DIGITS
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["image"])), np.asarray(image))
        # the character's pixels are its colour, and they lie on the side its answers name
        pixels = np.asarray(image).astype(int)
        ys, xs = np.nonzero((np.abs(pixels - np.array(COLORS[glyph.color])).sum(-1) < 10))
        assert len(xs) > 20
        assert (xs.mean() < 32) == (glyph.horizontal == "left") and (ys.mean() < 32) == (glyph.vertical == "top")


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown glyph question kind"):
        glyphs.write_glyphs(tmp_path, 5, kinds=("identity", "size"))
    with pytest.raises(ConfigError, match="at least 1"):
        glyphs.write_glyphs(tmp_path, 0)
    assert main(["data", "glyphs", "--out", str(tmp_path / "cli"), "--n", "12", "--split", "test"]) == 0
    assert "train on them with" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "cli" / "test.json").read_text())) == 12


def test_eval_asks_a_users_json_as_written(make_model, tmp_path, monkeypatch):
    """The preset's answer prompt is appended to built-in questions (trained with it), not to a user's JSON:
    training reads that as written, and a model that never saw the prompt answered noise (7% on glyphs)."""
    from vlmkit.eval import vqa

    model = make_model("llava-1.5", answer_prompt="Answer the question using a single word or phrase.").eval()
    seen = {}

    def fake_evaluate(model, dataset, **kw):
        seen["prompt"] = model.tokenizer.decode(dataset[0].input_ids)
        return {"accuracy": 0.0, "correct": 0, "total": 0, "seconds": 0.0, "predictions": []}

    monkeypatch.setattr(vqa, "evaluate", fake_evaluate)
    monkeypatch.setattr(vqa, "write_report", lambda report, out, name: (tmp_path / "r.json", tmp_path / "r.png"))
    path = glyphs.write_glyphs(tmp_path, 3, "test")
    vqa.run_eval(model, str(path), "test", tmp_path, False, tmp_path, verbose=False)
    assert "What" in seen["prompt"] or "Is the" in seen["prompt"]
    assert model.config.answer_prompt not in seen["prompt"]
    vqa.run_eval(model, "easy-vqa", "test", None, False, tmp_path, limit=2, verbose=False)
    assert model.config.answer_prompt in seen["prompt"]
