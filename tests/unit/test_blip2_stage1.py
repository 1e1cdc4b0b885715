"""BLIP-2's stage 1 as a run: a model without its LLM (never loaded), a Q-Former started from a BERT, the loss
terms logged apart, the LLM attached for stage 2, and retrieval scored as training scores similarity."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmkit.archs import from_name
from vlmkit.model.vlm import VisionLanguageModel


def blip2_config(backbones, **overrides):
    return from_name("blip2", scale="tiny", vision={"name_or_path": backbones["clip"], "feature_layer": -1},
                     llm={"name_or_path": backbones["llm"]}, connector={"name_or_path": backbones["bert"]},
                     **overrides)


@pytest.fixture
def no_llm_loading(monkeypatch):
    """Fails the test if the LLM's weights are read."""
    from vlmkit.llm import LanguageModel

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the LLM was loaded")
    monkeypatch.setattr(LanguageModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse(*a, **k)))
    return calls


def test_a_model_without_its_llm_saves_reloads_and_refuses_to_generate(backbones, tmp_path, no_llm_loading):
    from vlmkit.errors import ConfigError
    from vlmkit.infer.generate import Decoder

    model = VisionLanguageModel.from_config(blip2_config(backbones), verbose=False, with_llm=False)
    assert model.llm is None and set(model.parts()) == {"vision", "connector"}
    assert model.llm_hidden == 32  # the LLM's width, read from its config: the projection is sized for it
    assert model.connector.language_projection.out_features == 32
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["llm"] is None and saved["llm_hidden"] == 32
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.llm is None
    assert loaded.connector.tokenizer.get_vocab() == model.connector.tokenizer.get_vocab()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ConfigError, match="needs the language model"):
        Decoder(loaded)
    assert not no_llm_loading


def test_the_qformer_starts_from_its_bert(backbones):
    from transformers import BertForMaskedLM

    model = VisionLanguageModel.from_config(blip2_config(backbones), verbose=False, with_llm=False)
    bert = BertForMaskedLM.from_pretrained(backbones["bert"]).state_dict()
    connector = model.connector.state_dict()
    assert model.config.connector.embed_dim == 128 and model.config.connector.vocab_size == len(model.connector.tokenizer)
    layer = "qformer.encoder.layer.1."
    for ours, theirs in ((layer + "attention.attention.query.weight", "bert.encoder.layer.1.attention.self.query.weight"),
                         (layer + "intermediate.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"),
                         # the queries' own feed-forward starts as a copy of the text's (LAVIS)
                         (layer + "intermediate_query.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"),
                         (layer + "output_query.dense.weight", "bert.encoder.layer.1.output.dense.weight"),
                         ("qformer.layernorm.weight", "bert.embeddings.LayerNorm.weight"),
                         ("itg_head.dense.weight", "cls.predictions.transform.dense.weight")):
        assert torch.equal(connector[ours], bert[theirs]), ours
    # the vocabulary grew by [DEC]: the BERT's rows are kept, the new one is new
    words = connector["embeddings.word_embeddings.weight"]
    n = bert["bert.embeddings.word_embeddings.weight"].shape[0]
    assert words.shape[0] == n + 1 and torch.equal(words[:n], bert["bert.embeddings.word_embeddings.weight"])
    assert model.connector.tokenizer.bos_token == "[DEC]"


def test_stage_one_trains_without_the_llm_and_stage_two_loads_it(backbones, tmp_path, monkeypatch):
    from vlmkit.llm import LanguageModel
    from vlmkit.train.run import train_run

    loads = []
    original = LanguageModel.from_pretrained.__func__
    monkeypatch.setattr(LanguageModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    config = blip2_config(backbones, stages__representation__mixture="scenes:caption:n64:shapes2",
                          stages__representation__max_steps=6, stages__representation__batch_size=8,
                          stages__representation__lr={"connector": 1e-3},
                          stages__generative__mixture="scenes:caption:n64:shapes2",
                          stages__generative__max_steps=2, stages__generative__batch_size=8,
                          stages__vqa__mixture="scenes:vqa:n32:shapes2", stages__vqa__max_steps=2,
                          stages__vqa__batch_size=8)
    result = train_run(config, tmp_path / "run", stages=["representation"], verbose=False, log=lambda *a: None)
    assert result["model"].llm is None and not loads
    entries = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(entries) == 6
    for entry in entries:  # the three terms logged apart, and their sum is the loss
        assert set(entry["terms"]) == {"itc", "itm", "itg"}
        assert entry["loss"] == pytest.approx(sum(entry["terms"].values()), rel=1e-5)
        assert entry["tokens"] == 8  # the unit is the pair
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["llm"] is None
    # stage 2 resumes after stage 1 and loads the LLM then, with this run's settings (a longer max_length after a
    # failure), the parts as they were built
    import dataclasses

    result = train_run(dataclasses.replace(config, max_length=300), tmp_path / "run", resume=True, verbose=False,
                       log=lambda *a: None)
    assert result["model"].llm is not None and len(loads) == 1
    assert result["model"].config.max_length == 300 and result["model"].config.connector.embed_dim == 128
    assert [s["stage"] for s in result["stages"]] == ["generative", "vqa"]
    stage1 = VisionLanguageModel.from_pretrained(tmp_path / "run" / "checkpoints" / "1-representation")
    final = VisionLanguageModel.from_pretrained(tmp_path / "run" / "checkpoints" / "2-generative")
    assert final.llm is not None
    # the LLM stays frozen in stage 2 and the Q-Former's text side is not touched by it
    assert torch.equal(stage1.connector.text_projection.weight, final.connector.text_projection.weight)
    assert not torch.equal(stage1.connector.query_tokens, final.connector.query_tokens)


def test_retrieval_scores_similarity_as_training_does(backbones):
    from PIL import Image

    from vlmkit.eval import retrieval
    from vlmkit.objectives import blip2

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(blip2_config(backbones), verbose=False, with_llm=False).eval()
    with torch.no_grad():
        for param in model.connector.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (90, 90, 90)]
    images = [Image.new("RGB", (40, 40), c) for c in colours]
    texts = ["a red circle", "a green square", "a blue star", "a yellow triangle", "a teal ellipse", "a gray one"]
    features, image_embeds, ids, mask, text_embeds = retrieval.embed(model, images, texts, verbose=False)
    sim_i2t, sim_t2i = blip2.similarities(image_embeds, text_embeds, model.connector.temp)
    with torch.no_grad():  # the training objective's ITC embeddings, from its single unimodal pass
        out = model.connector.joint_outputs(ids, blip2.attention_mask("itc", model.connector.config.num_queries, mask),
                                            features)
        text_feat = F.normalize(model.connector.text_projection(out[:, model.connector.config.num_queries]), dim=-1)
    torch.testing.assert_close(text_feat, text_embeds, atol=1e-5, rtol=1e-5)
    report = retrieval.retrieval_metrics(model, images, texts, top_k=3, verbose=False)
    truth = torch.arange(6)
    assert report["itc"]["text_to_image_r1"] == pytest.approx(retrieval.recall_at(sim_t2i, truth, 1))
    assert report["itc"]["image_to_text_r5"] == pytest.approx(retrieval.recall_at(sim_i2t, truth, 5))
    # ITM re-ranks within the ITC top 3: R@5 cannot exceed the top 3's recall
    assert report["itm"]["text_to_image_r5"] <= retrieval.recall_at(sim_t2i, truth, 3) + 1e-9
    # the ITM re-ranked top-1 of text 0 is the argmax of itm + itc over its ITC top 3
    top = sim_t2i[0].topk(3).indices.tolist()
    scores = retrieval.itm_scores(model, features, ids, mask, [(i, 0) for i in top])
    best = top[int((scores + sim_t2i[0, top]).argmax())]
    missed = any(miss["text"] == texts[0] for miss in report["text_to_image_misses"])
    assert missed == (best != 0)


def test_recall_at_and_distinct_captions():
    from vlmkit.eval.retrieval import distinct_caption_records, recall_at

    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.0, 0.5, -0.2]])
    truth = torch.tensor([0, 1, 2])
    assert recall_at(scores, truth, 1) == pytest.approx(1 / 3)
    assert recall_at(scores, truth, 2) == pytest.approx(2 / 3)
    assert recall_at(scores, truth, 3) == pytest.approx(1.0)
    scores[2] = torch.tensor([float("-inf"), 0.5, float("-inf")])  # re-ranking never scored the truth: a miss
    assert recall_at(scores, truth, 3) == pytest.approx(2 / 3)
    records = [{"conversations": [{"value": "q"}, {"value": c}]} for c in ["A b", "a b", "c", "d", "c"]]
    assert [r["conversations"][1]["value"] for r in distinct_caption_records(records, 3)] == ["A b", "c", "d"]


def test_minigpt4_trains_only_the_projection_after_a_loaded_qformer(backbones, tmp_path):
    from vlmkit.errors import ConfigError
    from vlmkit.train.run import train_run

    torch.manual_seed(3)
    blip = VisionLanguageModel.from_config(blip2_config(backbones), verbose=False, with_llm=False)
    with torch.no_grad():  # a "trained" Q-Former: not what the BERT gives
        for param in blip.connector.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    blip.save_pretrained(tmp_path / "blip2")
    config = from_name("minigpt4", scale="tiny", vision={"name_or_path": backbones["clip"], "feature_layer": -1},
                       llm={"name_or_path": backbones["llm"]}, connector={"name_or_path": str(tmp_path / "blip2")},
                       stages__pretrain__mixture="scenes:caption:n32:shapes1", stages__pretrain__max_steps=3,
                       stages__pretrain__batch_size=4)
    model = train_run(config, tmp_path / "run", stages=["pretrain"], verbose=False, log=lambda *a: None)["model"]
    assert model.config.connector.embed_dim == 128 and model.connector.tokenizer is not None
    before, after = blip.connector.state_dict(), model.connector.state_dict()
    for key, value in before.items():
        if key.startswith("language_projection."):
            assert not torch.equal(value, after[key])  # new (MiniGPT-4's llama_proj), then trained
        else:
            assert torch.equal(value, after[key]), key  # loaded, and frozen through the stage
    entries = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert set(entries[0]["lr"]) == {"connector.language_projection"}
    # a run directory (its config.json is the run's, the model is in model/) is a trained Q-Former too
    assert (tmp_path / "run" / "config.json").exists()
    again = VisionLanguageModel.from_config(config.__class__.from_dict({**config.to_dict(), "connector": {
        **config.to_dict()["connector"], "name_or_path": str(tmp_path / "run")}}), verbose=False)
    for key, value in again.connector.state_dict().items():
        if not key.startswith("language_projection."):
            assert torch.equal(value, after[key]), key
    # a Q-Former only works on the features it learned from: another tower, or the same read otherwise, is refused
    with pytest.raises(ConfigError, match="trained on the features of"):
        VisionLanguageModel.from_config(config.__class__.from_dict({**config.to_dict(), "vision": {
            **config.to_dict()["vision"], "name_or_path": backbones["resnet"]}}), verbose=False)
    with pytest.raises(ConfigError, match="vision.feature_layer"):
        VisionLanguageModel.from_config(config.__class__.from_dict({**config.to_dict(), "vision": {
            **config.to_dict()["vision"], "feature_layer": -2}}), verbose=False)


def test_a_stage_names_an_unknown_inner_module():
    from types import SimpleNamespace

    from vlmkit.errors import ConfigError
    from vlmkit.train.freeze import apply_stage_freezing

    model = SimpleNamespace(parts=lambda: {"connector": torch.nn.Sequential(torch.nn.Linear(2, 2))})
    with pytest.raises(ConfigError, match="connector has no module 'projection'"):
        apply_stage_freezing(model, ["connector.projection"], log=lambda *a: None)


def test_an_instruction_aware_qformer_reads_the_question_and_not_the_answer(backbones):
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(blip2_config(backbones), verbose=False).eval()
    assert model.connector.reads_instruction
    template = get_template("blip2")
    n = model.num_image_tokens

    def rendered(question, answer):
        return render_conversation([{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
                                   template, model.tokenizer, num_image_tokens=n)

    pixels = torch.rand(1, 3, *model.image_transform.crop)
    with torch.no_grad():
        def image_tokens(r):
            ids = torch.tensor([r.input_ids])
            embeds, mask = model.embed(ids, [1], pixels, labels=torch.tensor([r.labels]))
            return embeds[mask]
        a, b, c = rendered("what color is it?", "red"), rendered("what color is it?", "blue"), \
            rendered("what shape is it?", "red")
        assert torch.equal(image_tokens(a), image_tokens(b))  # the answer is never read
        assert not torch.allclose(image_tokens(a), image_tokens(c))  # the question is
        # the instruction is the question's turn, without the image placeholders or special tokens
        extra = model.instruction_tokens(torch.tensor([a.input_ids]), [1], torch.tensor([a.labels]))
        text = model.connector.tokenizer.decode(extra["instruction_ids"][0], skip_special_tokens=True)
        assert text == "question : what color is it? answer :"
