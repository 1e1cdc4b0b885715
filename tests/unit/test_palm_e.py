"""PaLM-E (issue 34): the tabletop world and its plan executor, state vectors in the data, their placeholders in
the model (one MLP per kind, each vector at its own placeholder), the loss on the target only, and the preset
from the command line."""
import json
import random
import re

import pytest
import torch

from vlmkit.archs import from_name
from vlmkit.data import tabletop
from vlmkit.data.dataset import ConversationDataset, collate
from vlmkit.data.render import IGNORE_INDEX
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord
from vlmkit.model.vlm import VisionLanguageModel


# -- the world ---------------------------------------------------------------------------------------------
def test_scenes_are_seeded_and_numbered_left_to_right_bottom_to_top():
    assert tabletop.generate_scene(5).as_dict() == tabletop.generate_scene(5).as_dict()
    assert tabletop.generate_scene(5, "train").as_dict() != tabletop.generate_scene(5, "test").as_dict()
    for index in range(200):
        scene = tabletop.generate_scene(index)
        blocks = scene.blocks
        bottoms = [b.x for b in blocks if b.on is None]
        assert bottoms == sorted(bottoms) and 3 <= len(blocks) <= 4
        for j, block in enumerate(blocks):
            if block.on is not None:  # right after the block it stands on, never large on small
                assert block.on == j - 1 and blocks[j - 1].on is None
                assert tabletop.SIZE_RANK[block.size] <= tabletop.SIZE_RANK[blocks[j - 1].size]
            vector = tabletop.state_vector(scene, j)
            assert len(vector) == tabletop.STATE_WIDTH and all(0 <= v <= 1 for v in vector)
            assert vector[1] == (0 if block.on is None else round(blocks[block.on].side, 4))


def test_reference_plans_succeed_and_wrong_plans_fail():
    for index in range(300):
        scene = tabletop.generate_scene(index)
        blocks = scene.as_dict()["blocks"]
        for question in tabletop.scene_questions(scene, random.Random(index)):
            if question["family"] in tabletop.PLAN_FAMILIES:
                assert tabletop.execute(blocks, question["answer"], question["goal"]) == (True, "")
    # a scene with a tower: obj_1 (large) under obj_2 (small), obj_3 alone
    blocks = [{"color": "red", "size": "large", "side": 0.22, "x": 0.2, "on": None},
              {"color": "blue", "size": "small", "side": 0.13, "x": 0.2, "on": 0},
              {"color": "green", "size": "small", "side": 0.13, "x": 0.7, "on": None}]
    grasp = {"grasp": 1}
    assert tabletop.execute(blocks, "grasp obj_1", grasp)[0] is False  # something is on it
    assert tabletop.execute(blocks, "move obj_2 to table, grasp obj_1", grasp) == (True, "")
    assert tabletop.execute(blocks, "put obj_2 on obj_3; grasp obj_1", grasp) == (True, "")  # another valid plan
    assert tabletop.execute(blocks, "move obj_2 to table, grasp obj_1, grasp obj_3", grasp)[0] is False
    assert tabletop.execute(blocks, "grasp obj_9", grasp)[0] is False
    assert tabletop.execute(blocks, "the red one", grasp)[0] is False
    stack = {"put": 1, "on": 3}
    assert tabletop.execute(blocks, "move obj_2 to table, put obj_1 on obj_3", stack)[0] is False  # large on small
    assert tabletop.execute(blocks, "put obj_2 on obj_3", {"put": 2, "on": 3}) == (True, "")
    assert tabletop.can_place([tabletop.Block(**b) for b in blocks], 1, 2)
    assert not tabletop.can_place([tabletop.Block(**b) for b in blocks], 2, 1)  # obj_2 is on obj_1: not clear


def test_yes_no_families_have_both_answers_and_follow_the_rules():
    answers = {f: set() for f in ("q2", "q3", "q4")}
    for index in range(200):
        scene = tabletop.generate_scene(index)
        for q in tabletop.scene_questions(scene, random.Random(index)):
            if q["family"] in answers:
                answers[q["family"]].add(q["answer"])
            if q["family"] == "q4":
                i, j = (int(n) - 1 for n in re.findall(r"obj_(\d+)", q["question"]))
                assert (q["answer"] == "yes") == tabletop.can_place(scene.blocks, i, j)
    assert all(a == {"yes", "no"} for a in answers.values())


# -- states in the data and the model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def palm_model(backbones):
    torch.manual_seed(0)
    config = from_name("palm-e", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": backbones["llm"]})
    return VisionLanguageModel.from_config(config, verbose=False).eval()


def _records(n=2, view="state"):
    questions = []
    for index in range(n):
        scene = tabletop.generate_scene(index)
        states = [tabletop.state_vector(scene, j) for j in range(len(scene.blocks))]
        q = tabletop.scene_questions(scene, random.Random(index))[0]
        questions.append(dict(q, id=f"s{index}", image="x.png", states=states, scene=scene.as_dict()))
    return tabletop.records(questions, view)


def _dataset(model, records, mode="train"):
    return ConversationDataset(records, model.tokenizer, get_template(model.config.template), model.image_transform,
                               num_image_tokens=model.num_image_tokens, mode=mode, verbose=False,
                               state_kinds=model.config.states.kinds)


def test_each_placeholder_is_one_token_and_the_loss_sees_the_answer_only(palm_model):
    model = palm_model
    record = _records(1)[0]
    example = _dataset(model, [record]).examples[0]
    token = model.state_token_ids["obj"]
    assert list(example.input_ids).count(token) == len(record["states"]["obj"]) == example.states["obj"].shape[0]
    assert torch.equal(torch.from_numpy(example.states["obj"]), torch.tensor(record["states"]["obj"]))
    supervised = [int(t) for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised, skip_special_tokens=True).strip() == \
        record["conversations"][1]["value"]
    assert supervised[-1] == model.tokenizer.eos_token_id


def test_swapping_two_state_vectors_swaps_their_embeddings(palm_model):
    model = palm_model
    records = _records(2)
    batch = collate(_dataset(model, records).examples, model.tokenizer.pad_token_id)
    swapped = {"obj": batch.states["obj"].clone()}
    swapped["obj"][[0, 1]] = swapped["obj"][[1, 0]]
    with torch.no_grad():
        embeds, _ = model.embed(batch.input_ids, batch.image_counts, states=batch.states)
        again, _ = model.embed(batch.input_ids, batch.image_counts, states=swapped)
    where = (batch.input_ids == model.state_token_ids["obj"]).nonzero().tolist()
    (r0, c0), (r1, c1) = where[0], where[1]
    assert torch.equal(again[r0, c0], embeds[r1, c1]) and torch.equal(again[r1, c1], embeds[r0, c0])
    assert not torch.equal(embeds[r0, c0], embeds[r1, c1])
    others = torch.ones_like(batch.input_ids, dtype=torch.bool)
    others[r0, c0] = others[r1, c1] = False
    assert torch.equal(again[others], embeds[others])  # nothing else moves
    # the second sample's vectors follow the first's in the batch: they fill the second row's placeholders
    first_row = int((batch.input_ids[0] == model.state_token_ids["obj"]).sum())
    expected = model.states("obj", batch.states["obj"][first_row:first_row + 1])[0]
    second = (batch.input_ids[1] == model.state_token_ids["obj"]).nonzero()[0, 0]
    assert torch.allclose(embeds[1, second], expected.to(embeds.dtype))
    # positions are ordinary consecutive ones
    assert torch.equal(model.position_ids(batch.attention_mask)[0, :5], torch.arange(5))


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.pop("states"), "placeholder(s) but no 'states'"),
    (lambda r: r["states"]["obj"].pop(), "placeholder(s) but 2 obj state vector(s)"),
    (lambda r: r["states"]["obj"][1].append(0.5), "states['obj'][1] has 8 numbers; the model's obj vectors have 7"),
    (lambda r: r["states"]["obj"][0].__setitem__(2, float("nan")), "not a finite number"),
    (lambda r: r["states"].update(pose=[[1.0]]), "unknown kind(s) ['pose']"),
    (lambda r: r.__setitem__("states", "abc"), "'states' must be an object"),
    (lambda r: r["conversations"][1].__setitem__("value", "it is <obj>"), "an assistant turn contains <obj>"),
])
def test_a_bad_state_record_is_named_with_what_is_wrong(palm_model, change, expected):
    record = _records(1)[0]
    record["scene"]["blocks"] = record["scene"]["blocks"][:3]
    record["states"]["obj"] = record["states"]["obj"][:3]
    record["conversations"][0]["value"] = tabletop.prompt("What colour is obj_1?", 3, "state")
    change(record)
    with pytest.raises(BadRecord) as error:
        _dataset(palm_model, [record])
    assert error.value.record_id == record["id"] and expected in str(error.value)


def test_a_model_without_state_kinds_refuses_state_records(backbones):
    config = from_name("llava", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": backbones["llm"]})
    model = VisionLanguageModel.from_config(config, verbose=False)
    record = {"id": "r", "states": {"obj": [[0.0] * 7]},
              "conversations": [{"from": "human", "value": "Object 1 is <obj>. Hi?"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadRecord, match="takes no state vectors"):
        _dataset(model, [record])


def test_state_models_save_reload_and_generate_the_same(palm_model, tmp_path):
    model = palm_model
    with torch.no_grad():
        for p in model.states.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "m")
    again = VisionLanguageModel.from_pretrained(tmp_path / "m")
    batch = collate(_dataset(model, _records(2), mode="prompt").examples, model.tokenizer.pad_token_id, "left")
    with torch.no_grad():
        a = model.logits(batch.input_ids, batch.attention_mask, batch.image_counts, states=batch.states)
        b = again.logits(batch.input_ids, batch.attention_mask, batch.image_counts, states=batch.states)
    assert torch.equal(a, b)
    # generation with states: batched == each prompt alone
    from vlmkit.eval.vqa import generate_answers

    dataset = _dataset(model, _records(3), mode="prompt")
    together = generate_answers(again, dataset, batch_size=3, max_new_tokens=4, verbose=False)
    alone = [generate_answers(again, _dataset(model, [r], mode="prompt"), max_new_tokens=4, verbose=False)[0]
             for r in _records(3)]
    assert together == alone


def test_palm_e_trains_both_variants_from_the_cli_and_evaluates(backbones, tmp_path, capsys, monkeypatch):
    """The frozen-LLM stage trains the encoders only; co-training the LLM too; the run reloads and `eval --task
    tamp` scores questions and executes plans; both views with an image train too."""
    from vlmkit.cli import main

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    common = ["--vision.name-or-path", backbones["clip"], "--vision.select", "patch", "--llm.name-or-path",
              backbones["llm"], "--cotrain.batch-size", "8"]
    argv = ["train", "--preset", "palm-e", "--run-dir", str(run), "--encoders.max-steps", "2",
            "--cotrain.max-steps", "2", "--encoders.mixture", "tabletop:state:n8", "--cotrain.mixture",
            "tabletop:state:n8", "--encoders.batch-size", "8", *common]
    assert main(argv) == 0
    first = VisionLanguageModel.from_pretrained(run / "checkpoints" / "1-encoders")
    final = VisionLanguageModel.from_pretrained(run / "model")
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(backbones["llm"]).state_dict()
    own = first.llm.causal_lm.state_dict()
    assert all(torch.equal(own[k], v) for k, v in llm.items() if "layers." in k)  # the LLM frozen in stage 1
    assert not all(torch.equal(final.llm.causal_lm.state_dict()[k], v) for k, v in llm.items() if "layers." in k)
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "tamp", "--data", "tabletop:state:test:n4"]) == 0
    out = capsys.readouterr().out
    assert "tamp: question accuracy" in out and "plan success" in out
    report = json.loads((run / "eval_tamp.json").read_text())
    assert {row["family"] for row in report["predictions"]} >= {"q1", "q2", "q3", "q4", "p1"}
    both = ["train", "--preset", "palm-e", "--run-dir", str(tmp_path / "both"), "--stages", "cotrain",
            "--cotrain.max-steps", "1", "--cotrain.mixture", "tabletop:both:n4", *common]
    assert main(both) == 0


def test_presets_list_the_nine_designs(capsys):
    from vlmkit.cli import main

    assert main(["presets"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    designs = last.split(" designs: ")[1].split(", ")
    assert sorted(designs) == sorted(["LLaVA", "LLaVA-1.5", "MiniGPT-4", "MiniGPT-v2", "BLIP-2", "CogVLM", "Qwen-VL",
                                      "PaLM-E", "VisualGLM"]) and " of 9 designs" in last


def test_data_tabletop_writes_every_view_as_llava_json(tmp_path, capsys):
    from vlmkit.cli import main

    assert main(["data", "tabletop", "--out", str(tmp_path), "--n", "3", "--split", "test"]) == 0
    views = {view: json.loads((tmp_path / f"test_{view}.json").read_text()) for view in tabletop.VIEWS}
    assert len({len(records) for records in views.values()}) == 1
    state, image, both = views["state"][0], views["image"][0], views["both"][0]
    assert "image" not in state and "states" not in image and "states" in both and "image" in both
    assert (tmp_path / both["image"]).is_file()
    assert state["conversations"][0]["value"].count("<obj>") == len(state["states"]["obj"])
    assert main(["data", "compare", "--out", str(tmp_path / "c"), "--n", "4", "--images", "3"]) == 0
    records = json.loads((tmp_path / "c" / "train_compare3.json").read_text())
    assert len(records) == 4 and all(len(r["image"]) == 3 for r in records)
