"""Slow, seeded end-to-end: tiny backbones (built into the cache if missing), both llava-1.5 stages on
easy-VQA with a small step budget, then held-out test questions. A few minutes on a 2-core CPU."""
import json

import pytest

from vlmkit.archs import from_name
from vlmkit.data import easyvqa
from vlmkit.eval.vqa import run_eval
from vlmkit.infer.chat import answer, first_user_turn
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.train.run import train_run

MAJORITY_BASELINE = 0.373


@pytest.mark.slow
def test_llava_15_learns_easy_vqa(tmp_path):
    # the preset's own instruction recipe (single questions, batch 32, lr 2e-3), cut to 500 steps (of 2,412)
    config = from_name("llava-1.5", scale="tiny", stages__align__max_steps=60, stages__instruct__max_steps=500)
    result = train_run(config, tmp_path / "run", verbose=False)
    first, second = result["stages"]
    assert second["final_loss"] < second["first_loss"] * 0.6
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 60 + 500 and (tmp_path / "run" / "loss.png").stat().st_size > 10_000

    model = VisionLanguageModel.from_pretrained(tmp_path / "run" / "model")
    report = run_eval(model, "easy-vqa", "test", None, False, tmp_path / "run", limit=1500, verbose=False)
    assert report["total"] == 1500
    assert report["accuracy"] > MAJORITY_BASELINE + 0.25, report["per_answer"]
    colour_questions = [r for r in report["predictions"] if r["answer"] in easyvqa.COLORS]
    assert sum(r["correct"] for r in colour_questions) / len(colour_questions) > 0.5  # it reads the image

    questions, paths = easyvqa.load_split("test")
    prompt = model.config.answer_prompt  # as trained and evaluated (and as the demo asks): none at the tiny scale
    text = f"{questions[0].text}\n{prompt}" if prompt else questions[0].text
    reply = answer(model, [{"role": "user", "content": first_user_turn(text, True)}], [paths[questions[0].image_id]])
    assert reply in easyvqa.answers()
