"""The data path: weighted mixtures, lazy images through loader workers, the feature-cache budget, the loss
normalised per token over the whole optimiser step, and clear errors for paths that do not exist."""
import json

import pytest
import torch

from vlmkit.cli import main
from vlmkit.data.dataset import ConversationDataset, collate
from vlmkit.data.loader import batch_loader, image_loader
from vlmkit.data.sources import Mixture, Source, parse_mixture
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord, ConfigError

ANSWERS = ["red", "blue", "a green shape with round edges", "no", "it is a small yellow triangle", "yes"]


def write_records(tmp_path, image_files, name: str, count: int, answers=ANSWERS):
    records = [{"id": f"{name}-{i}", "image": image_files[i % 3].split("/")[-1], "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": answers[i % len(answers)]}]}
        for i in range(count)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def train_log(backbones, tmp_path, run_name: str, data, *extra) -> list[dict]:
    """`vlmkit train` of the instruct stage on `data` with the test backbones; the per-step log."""
    run = tmp_path / run_name
    assert main(["train", "--preset", "llava-1.5", "--run-dir", str(run), "--data", str(data), "--image-folder",
                 str(tmp_path), "--stages", "instruct", "--vision-tower", backbones["clip"], "--llm", backbones["llm"],
                 *extra]) == 0
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_parse_mixture_inline_and_file(tmp_path):
    assert parse_mixture("easy-vqa:instructions=1,data/a.json=0.5, b.jsonl") == [
        Source("easy-vqa:instructions", 1.0), Source("data/a.json", 0.5), Source("b.jsonl", 1.0)]
    spec = tmp_path / "mix.json"
    spec.write_text(json.dumps([{"source": "a.json", "weight": 2, "image_folder": "imgs", "template": "chatml"}]))
    assert parse_mixture(str(spec)) == [Source("a.json", 2.0, "imgs", "chatml")]
    spec.write_text(json.dumps([{"source": "a.json", "wieght": 2}]))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['wieght'\]"):
        parse_mixture(str(spec))
    with pytest.raises(ConfigError, match="weight must be a number"):
        parse_mixture("a.json=lots")
    with pytest.raises(ConfigError, match="every weight is 0"):
        parse_mixture("a.json=0")


def test_mixture_epoch_follows_the_weights():
    mixture = Mixture(["a", "b", "c"], [(0, 10), (10, 30), (30, 34)], [2.0, 0.5, 1.0])
    epoch = mixture.epoch(seed=3, epoch=0)
    assert sorted(i for i in epoch if i < 10) == sorted(list(range(10)) * 2)
    from_b = [i for i in epoch if 10 <= i < 30]
    assert len(from_b) == 10 and len(set(from_b)) == 10  # a half, without repeats
    assert sorted(i for i in epoch if i >= 30) == [30, 31, 32, 33]
    assert mixture.per_source() == {"a": 20, "b": 10, "c": 4} and mixture.epoch_size() == len(epoch) == 34
    assert mixture.epoch(3, 0) == epoch  # a pure function of (seed, epoch): the checkpoint's position suffices
    assert set(mixture.epoch(3, 1)) != set(epoch)  # another half of b next epoch


def test_train_on_a_weighted_mixture(backbones, tmp_path, image_files):
    a = write_records(tmp_path, image_files, "a", 8)
    b = write_records(tmp_path, image_files, "b", 12)
    run = tmp_path / "run"
    argv = ["train", "--preset", "llava-1.5", "--run-dir", str(run), "--image-folder", str(tmp_path),
            "--stages", "instruct", "--instruct.mixture", f"{a}=2,{b}=0.5", "--instruct.batch-size", "4",
            "--instruct.min-steps", "0", "--instruct.epochs", "1",
            "--vision-tower", backbones["clip"], "--llm", backbones["llm"], "--workers", "0"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples_per_epoch"]["instruct"] == {str(a): 16, str(b): 6}
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # one epoch = 22 samples in batches of 4


def test_loss_is_normalised_over_the_whole_step(backbones, tmp_path, image_files):
    """Batch 32 x accumulation 1 and batch 16 x accumulation 2 see the same 32 records in their first step:
    same loss and the same gradient (its norm before clipping), though the micro-batches' token counts
    differ (answers of 1 to 6 words)."""
    data = write_records(tmp_path, image_files, "d", 32)
    logs = [train_log(backbones, tmp_path, f"run{batch}", data, "--instruct.max-steps", "1", "--instruct.batch-size",
                      str(batch), "--instruct.grad-accum", str(accum), "--workers", "0")[0]
            for batch, accum in ((32, 1), (16, 2))]
    assert logs[0]["tokens"] == logs[1]["tokens"]
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-5)
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-4)


@pytest.fixture
def dataset(make_model, tmp_path, image_files):
    model = make_model("llava-1.5", vision="clip")
    records = json.loads(write_records(tmp_path, image_files, "lazy", 12).read_text())
    data = ConversationDataset(records, model.tokenizer, get_template("vicuna_v1"), model.image_transform,
                               num_image_tokens=model.num_image_tokens, image_folder=tmp_path, verbose=False)
    return model, data


def test_images_are_decoded_only_when_read(dataset):
    model, data = dataset
    assert not any(isinstance(v, torch.Tensor) for v in vars(data).values())  # the index, no pixels
    batches = [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    alone = list(batch_loader(data, batches, model.tokenizer.pad_token_id, pixels=True, workers=0))
    workers = list(batch_loader(data, batches, model.tokenizer.pad_token_id, pixels=True, workers=2))
    for mine, theirs, indices in zip(alone, workers, batches):
        expected = collate([data[i] for i in indices], model.tokenizer.pad_token_id)
        assert torch.equal(mine.input_ids, expected.input_ids) and torch.equal(theirs.input_ids, expected.input_ids)
        assert torch.equal(mine.pixel_values, theirs.pixel_values)
        assert torch.equal(mine.pixel_values, data.pixel_values[expected.image_indices])
    images = torch.cat(list(image_loader(data, batch_size=2, workers=2)))
    assert torch.equal(images, data.pixel_values) and len(images) == 3


def test_an_image_broken_after_validation_names_its_record(dataset, tmp_path):
    model, data = dataset
    path = data.images[1]
    with open(path, "r+b") as handle:  # keep the header, break the pixel data
        handle.seek(40)
        handle.write(b"\0" * 30)
    with pytest.raises(BadRecord, match=r"record 'lazy-1'.*cannot decode"):
        list(batch_loader(data, [[0, 1]], model.tokenizer.pad_token_id, pixels=True, workers=2))


def test_feature_cache_budget_falls_back_to_encoding_each_batch(backbones, tmp_path, image_files, capsys):
    """With no room for the frozen encoder's features, each batch's pixels are encoded: same losses."""
    data = write_records(tmp_path, image_files, "f", 12)
    losses = [[entry["loss"] for entry in train_log(backbones, tmp_path, f"run{budget}", data, "--instruct.max-steps",
                                                    "4", "--instruct.batch-size", "4", "--feature-cache-gb", budget,
                                                    "--workers", "1", "--instruct.train", "connector,llm")]
              for budget in ("4", "0")]
    assert "more than the cache budget (--feature-cache-gb 0)" in capsys.readouterr().out
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_local_path_that_does_not_exist_is_one_line(backbones, tmp_path, capsys):
    typo = backbones["llm"] + "-typo"
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--llm", typo, "--vision-tower", backbones["clip"],
                 "--stages", "instruct", "--instruct.max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmkit: error: --llm.name-or-path") and typo in err and "did you mean" in err
    assert "Traceback" not in err


def test_a_packed_stage_trains_like_the_padded_one(backbones, tmp_path, image_files):
    """--STAGE.pack-to packs each micro-batch's samples into rows: the same samples, the same per-token loss
    and gradients as padded rows, in fewer, longer rows."""
    data = write_records(tmp_path, image_files, "p", 16)
    logs = [train_log(backbones, tmp_path, f"run{pack}", data, "--instruct.max-steps", "3", "--instruct.batch-size",
                      "8", "--instruct.pack-to", pack, "--workers", "0") for pack in ("0", "256")]
    for padded, packed in zip(*logs):
        assert padded["tokens"] == packed["tokens"] and padded["rows"] == 8 and packed["rows"] < 8
        assert padded["loss"] == pytest.approx(packed["loss"], rel=1e-5)
        assert padded["grad_norm"] == pytest.approx(packed["grad_norm"], rel=1e-4)
    too_short = ["train", "--run-dir", str(tmp_path / "short"), "--data", str(data), "--image-folder", str(tmp_path),
                 "--stages", "instruct", "--instruct.pack-to", "8", "--vision-tower", backbones["clip"],
                 "--llm", backbones["llm"]]
    assert main(too_short) == 2


def test_a_shared_prefix_stage_trains_like_the_padded_one(backbones, tmp_path, image_files):
    """--STAGE.share-prefix writes an image's samples in rows after one copy of their common prefix: a step over
    the whole data set (16 records on 3 images) has the padded step's tokens, loss and gradient, in 6 rows."""
    data = write_records(tmp_path, image_files, "s", 16)
    logs = [train_log(backbones, tmp_path, f"run{k}", data, "--instruct.max-steps", "1", "--instruct.batch-size",
                      "16", "--instruct.share-prefix", k, "--workers", "0")[0] for k in ("0", "4")]
    padded, shared = logs
    assert padded["tokens"] == shared["tokens"] and padded["rows"] == 16 and shared["rows"] == 6  # 6+5+5 -> 2+2+2
    assert padded["loss"] == pytest.approx(shared["loss"], rel=1e-5)
    assert padded["grad_norm"] == pytest.approx(shared["grad_norm"], rel=1e-4)
    both = ["train", "--run-dir", str(tmp_path / "both"), "--data", str(data), "--image-folder", str(tmp_path),
            "--stages", "instruct", "--instruct.pack-to", "256", "--instruct.share-prefix", "4",
            "--vision-tower", backbones["clip"], "--llm", backbones["llm"]]
    assert main(both) == 2


@pytest.mark.parametrize("trains", ["connector,llm", "connector"])
def test_gradient_checkpointing_trains_the_same(backbones, tmp_path, image_files, monkeypatch, trains):
    """--gradient-checkpointing recomputes the LLM's activations in the backward pass: same losses and gradients,
    also when the LLM is frozen (LLaVA's stage 1: the gradient still crosses every layer to the connector)."""
    import torch.utils.checkpoint

    calls = []  # vlmkit runs each decoder layer through torch's checkpoint function
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = write_records(tmp_path, image_files, "g", 8)
    logs = [train_log(backbones, tmp_path, f"run-{flag}", data, "--instruct.max-steps", "3", "--instruct.batch-size",
                      "4", "--workers", "0", "--instruct.train", trains, flag)
            for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing")]
    assert len(calls) == 3 * 2  # 3 steps x the test LLM's 2 layers, in the checkpointed run only
    for plain, checkpointed in zip(*logs):
        assert plain["loss"] == pytest.approx(checkpointed["loss"], rel=1e-6)
        assert plain["grad_norm"] == pytest.approx(checkpointed["grad_norm"], rel=1e-5)
