"""The frozen-feature probe and the printed, floored stage schedule (issue 15, item 2)."""
import torch

from vlmkit.config import StageConfig
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.templates import get_template
from vlmkit.train.loop import stage_schedule
from vlmkit.train.probe import answer_probe


def _colour_data(n_images=240, separable=True, seed=0):
    """Features of n images (n, 4 tokens, 16); image i has colour i % 4, written into channels 0-3 when separable."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, 4, 16, generator=g)
    colours = ["red", "blue", "green", "gray"]
    triples = []
    for i in range(n_images):
        if separable:
            features[i, :, i % 4] += 3.0
        triples.append((i, "What colour is the shape?", colours[i % 4]))
        triples.append((i, "is there a red shape?", "yes" if i % 4 == 0 else "no"))
    return features, triples


def test_probe_reads_separable_features_and_flags_uninformative_ones():
    features, triples = _colour_data()
    good = answer_probe(features, triples)
    assert good.questions == 2 and good.held_out == 2 * 60
    assert good.accuracy > 0.95 and not good.poor
    # majority answer: 'no' for the yes/no question (3 of 4), a quarter for the colour question
    assert 0.4 < good.majority < 0.6
    features, triples = _colour_data(separable=False)
    bad = answer_probe(features, triples)
    assert bad.accuracy < 0.7 and bad.poor
    assert "held-out" in bad.describe() and "2 repeated questions" in bad.describe()


def test_probe_is_deterministic_and_leaves_the_global_rng_alone():
    features, triples = _colour_data()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = answer_probe(features, triples)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    assert answer_probe(features, triples) == first


def test_probe_skips_free_text_and_rare_questions():
    features = torch.randn(100, 4, 8)
    captions = [(i, "Describe the image.", f"a unique caption number {i}") for i in range(100)]
    assert answer_probe(features, captions) is None  # answers are free text, not classes
    rare = [(i, f"question {i}?", "yes" if i % 2 else "no") for i in range(100)]
    assert answer_probe(features, rare) is None  # no question repeats


def test_dataset_keeps_each_turns_question_and_answer(make_model, tmp_path, image_files):
    model = make_model()
    records = [
        {"id": "a", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat  colour?"}, {"from": "gpt", "value": "red "},
            {"from": "human", "value": "is it round?"}, {"from": "gpt", "value": "no"}]},
        {"id": "b", "image": "img1.png", "conversations": [
            {"role": "user", "content": "what colour?\n<image>"}, {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "describe it"},
            {"role": "assistant", "content": "a blue square on a white ground, slightly left"}]},  # free text: not kept
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    data = ConversationDataset(records, model.tokenizer, get_template("vicuna_v1"), model.image_transform,
                               num_image_tokens=model.num_image_tokens, max_length=256, image_folder=tmp_path,
                               source="data.json", verbose=False)
    assert data.question_answers == [(0, "what colour?", "red"), (0, "is it round?", "no"), (1, "what colour?", "blue")]
    both = ConversationDataset.concat([data, data], [1.0, 1.0])
    assert both.question_answers == data.question_answers * 2  # same paths: image indices map to the same images


def test_schedule_floor_and_its_printed_reason():
    stage = StageConfig(name="instruct", epochs=1, batch_size=8, min_steps=500)
    steps, text = stage_schedule(stage, 1500, 188)
    assert steps == 500 and "raised" in text and "2.66 epochs" in text and "--instruct.min-steps 0" in text
    steps, text = stage_schedule(stage, 4000, 500)
    assert steps == 500 and "1 epoch = 500 optimiser steps" in text
    steps, _ = stage_schedule(StageConfig(name="instruct", epochs=3, batch_size=8, min_steps=500), 4000, 500)
    assert steps == 1500  # the floor never shortens a stage
    steps, text = stage_schedule(StageConfig(name="instruct", max_steps=7, min_steps=500), 1500, 188)
    assert steps == 7 and "max_steps 7" in text  # an explicit step count wins
