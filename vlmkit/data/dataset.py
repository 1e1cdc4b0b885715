"""Records -> rendered, validated training/eval examples, and the collate that pads them.

Every record is rendered and every image's header read before any training step, so a bad record stops the
run at once with one line naming it (or, with `skip_bad=True`, is skipped and counted by reason). Pixels are
decoded only when a batch needs them (`pixels`, in DataLoader workers: `vlmkit.data.loader`), so memory holds
the index — token ids and image paths — not the images. Each example refers to its images by index into
`dataset.images`, which also lets a frozen encoder's features be cached per image.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlmkit.data.images import ImageTransform, check_image, load_image
from vlmkit.data.render import IGNORE_INDEX, IMAGE_TOKEN, normalise_messages, render_conversation
from vlmkit.data.templates import Template
from vlmkit.errors import BadRecord, VlmkitError


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA conversation file (a JSON list, or JSON lines); errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise VlmkitError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VlmkitError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmkitError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(records, list):
        raise VlmkitError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def record_images(record: dict, image_folder: str | os.PathLike | None, record_id, confine: bool = False
                  ) -> list[str]:
    """The record's image paths: relative ones under `image_folder`, absolute ones as written. With `confine`
    (--confine-images), a path that leads outside the folder (absolute, `..`, or a symbolic link out of it) is a
    bad record: data from someone else then reads only the folder it came with."""
    images = record.get("image", record.get("images"))
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRecord(record_id, "'image' must be a file name or a list of file names", kind="schema")
    if any("\x00" in name for name in images):
        raise BadRecord(record_id, "an image path contains a NUL character", kind="schema")
    folder = Path(image_folder) if image_folder else None
    paths = [str(folder / name) if folder is not None and not os.path.isabs(name) else name for name in images]
    if confine:
        if folder is None:
            raise BadRecord(record_id, "--confine-images needs --image-folder", kind="schema")
        root = folder.resolve()
        for name, path in zip(images, paths):
            if not Path(path).resolve().is_relative_to(root):
                raise BadRecord(record_id, f"image {name!r} is outside --image-folder {folder} (refused by "
                                           "--confine-images)", kind="outside_folder")
    return paths


@dataclass
class Example:
    record_id: str
    input_ids: list[int] | np.ndarray  # a dataset's examples hold int32 arrays
    labels: list[int] | np.ndarray
    image_indices: list[int]
    answer: str | None = None  # reference answer, for evaluation examples
    states: dict | None = None  # PaLM-E: {kind: (n, width) float32 vectors, in placeholder order}


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, error: BadRecord) -> None:
        self.counts[error.kind] += 1
        self.examples.setdefault(error.kind, str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 records"
        parts = ", ".join(f"{kind}: {n}" for kind, n in self.counts.most_common())
        return f"skipped {self.total} bad records ({parts})"


SHORT_ANSWER = 32  # characters: the probe reads class-like answers; free text is not kept (LLaVA-665k has millions)


def record_states(record: dict, messages: list[dict], record_id, kinds: dict[str, int]) -> dict | None:
    """The record's state vectors (PaLM-E) as {kind: (n, width) float32}, checked against its `<kind>`
    placeholders and the model's kinds (`kinds`: name -> width): a missing vector, a wrong width or a number that
    is not finite is a bad record naming what is wrong. `states` may be a list when the model has one kind."""
    given = record.get("states")
    counts = {kind: sum(m["content"].count(f"<{kind}>") for m in messages if m["role"] == "user") for kind in kinds}
    for kind in kinds:
        if any(f"<{kind}>" in m["content"] for m in messages if m["role"] == "assistant"):
            raise BadRecord(record_id, f"an assistant turn contains <{kind}> (observations go in user turns)",
                            kind="state_count")
    if given is None:
        missing = {kind: n for kind, n in counts.items() if n}
        if missing:
            kind, n = next(iter(missing.items()))
            raise BadRecord(record_id, f"has {n} <{kind}> placeholder(s) but no 'states'", kind="state_count")
        return None
    if not kinds:
        raise BadRecord(record_id, "has 'states', but this model takes no state vectors (config states.kinds)",
                        kind="schema")
    if isinstance(given, list) and len(kinds) == 1:
        given = {next(iter(kinds)): given}
    if not isinstance(given, dict):
        raise BadRecord(record_id, "'states' must be an object {kind: [[numbers], ...]}", kind="schema")
    unknown = set(given) - set(kinds)
    if unknown:
        raise BadRecord(record_id, f"'states' has unknown kind(s) {sorted(unknown)}; the model takes "
                                   f"{', '.join(sorted(kinds))}", kind="schema")
    out = {}
    for kind, width in kinds.items():
        vectors = given.get(kind, [])
        if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
            raise BadRecord(record_id, f"states[{kind!r}] must be a list of vectors (lists of numbers)", kind="schema")
        if len(vectors) != counts[kind]:
            raise BadRecord(record_id, f"has {counts[kind]} <{kind}> placeholder(s) but {len(vectors)} {kind} state "
                                       "vector(s)", kind="state_count")
        for i, vector in enumerate(vectors):
            if len(vector) != width:
                raise BadRecord(record_id, f"states[{kind!r}][{i}] has {len(vector)} numbers; the model's {kind} "
                                           f"vectors have {width}", kind="state_width")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in vector):
                raise BadRecord(record_id, f"states[{kind!r}][{i}] holds a value that is not a finite number",
                                kind="state_width")
        out[kind] = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), width)
    return out


def _turn_pairs(record: dict) -> list[tuple[str, str]]:
    """(question, answer) of each user turn followed by a short assistant turn, the image placeholder removed and
    whitespace collapsed (the record has already been validated)."""
    messages = normalise_messages(record["conversations"], record.get("id", "?"))
    return [(" ".join(q["content"].replace(IMAGE_TOKEN, " ").split()), a["content"].strip())
            for q, a in zip(messages, messages[1:])
            if q["role"] == "user" and a["role"] == "assistant" and len(a["content"].strip()) <= SHORT_ANSWER]


class ConversationDataset(Dataset):
    """Rendered conversations with their images.

    mode='train': the whole conversation, loss on assistant turns.
    mode='prompt': the last assistant turn is held out as `answer` and the prompt ends with the assistant
    cue, for generation and evaluation.
    """

    def __init__(self, records: list[dict], tokenizer, template: Template, transform: ImageTransform, *,
                 num_image_tokens: int, max_length: int | None = None, image_folder=None, skip_bad: bool = False,
                 source: str | None = None, mode: str = "train", answer_prompt: str = "",
                 verbose: bool = True, confine_images: bool = False, state_kinds: dict[str, int] | None = None,
                 max_images: int | None = None):
        self.examples: list[Example] = []
        self.images: list[str] = []
        self.image_owners: list[str] = []  # the first record that uses each image, for error messages
        # (image index, question, short answer) of each turn of a one-image record: what the frozen-feature probe reads
        self.question_answers: list[tuple[int, str, str]] = []
        self.transform = transform
        self.skipped = SkipReport()
        self.source = source
        self.state_kinds = dict(state_kinds or {})
        self.max_images = max_images
        image_index: dict[str, int] = {}
        for position, record in enumerate(tqdm(records, desc=f"reading {source or 'records'}", disable=not verbose,
                                               mininterval=1.0)):
            record_id = record.get("id", f"#{position}") if isinstance(record, dict) else f"#{position}"
            try:
                example, paths = self._prepare(record, record_id, tokenizer, template, num_image_tokens,
                                               max_length, image_folder, mode, answer_prompt, confine_images,
                                               self.state_kinds, max_images)
                for path in paths:
                    if path not in image_index:
                        check_image(path, record_id, transform=transform)
            except BadRecord as error:
                error.source = error.source or source
                if not skip_bad:
                    raise BadRecord(error.record_id, error.reason, error.kind, source) from None
                self.skipped.add(error)
                continue
            for path in paths:
                if path not in image_index:
                    image_index[path] = len(self.images)
                    self.images.append(path)
                    self.image_owners.append(str(record_id))
            example.image_indices = [image_index[path] for path in paths]
            self.examples.append(example)
            if mode == "train" and len(paths) == 1:
                self.question_answers += [(example.image_indices[0], q, a) for q, a in _turn_pairs(record)]
        if not self.examples:
            raise VlmkitError(f"{source or 'data'}: no usable records ({self.skipped.summary()})")
        self.mixture = Mixture.single(source or "data", len(self.examples))

    @classmethod
    def concat(cls, datasets: list["ConversationDataset"], weights: list[float]) -> "ConversationDataset":
        """One dataset holding every source's examples (images shared by path), sampled by `weights`."""
        if len(datasets) == 1 and weights[0] == 1.0:
            return datasets[0]
        out = cls.__new__(cls)
        out.examples, out.images, out.image_owners, out.question_answers = [], [], [], []
        out.transform, out.skipped = datasets[0].transform, SkipReport()
        out.state_kinds, out.max_images = datasets[0].state_kinds, datasets[0].max_images
        out.source = " + ".join(d.source or "data" for d in datasets)
        index: dict[str, int] = {}
        ranges = []
        for dataset in datasets:
            remap = []
            for path, owner in zip(dataset.images, dataset.image_owners):
                if path not in index:
                    index[path] = len(out.images)
                    out.images.append(path)
                    out.image_owners.append(owner)
                remap.append(index[path])
            start = len(out.examples)
            out.examples += [Example(e.record_id, e.input_ids, e.labels, [remap[i] for i in e.image_indices], e.answer,
                                     e.states) for e in dataset.examples]
            out.question_answers += [(remap[i], q, a) for i, q, a in dataset.question_answers]
            ranges.append((start, len(out.examples)))
            out.skipped.counts.update(dataset.skipped.counts)
            for kind, text in dataset.skipped.examples.items():
                out.skipped.examples.setdefault(kind, text)
        out.mixture = Mixture([d.source or "data" for d in datasets], ranges, list(weights))
        return out

    @staticmethod
    def _prepare(record, record_id, tokenizer, template, num_image_tokens, max_length, image_folder, mode,
                 answer_prompt, confine_images=False, state_kinds=None, max_images=None) -> tuple[Example, list[str]]:
        if not isinstance(record, dict):
            raise BadRecord(record_id, f"a record must be an object, got {type(record).__name__}", kind="schema")
        conversation = record.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            raise BadRecord(record_id, "has no 'conversations' list", kind="schema")
        images = record_images(record, image_folder, record_id, confine_images)
        messages = normalise_messages(conversation, record_id)
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
        if placeholders != len(images):
            raise BadRecord(record_id, f"has {len(images)} image(s) but {placeholders} <image> placeholder(s)",
                            kind="image_count")
        if max_images is not None and len(images) > max_images:
            raise BadRecord(record_id, f"has {len(images)} images; this model takes at most {max_images} (max_images)",
                            kind="image_count")
        states = record_states(record, messages, record_id, state_kinds or {})
        answer = None
        if mode == "prompt":
            if messages[-1]["role"] != "assistant":
                raise BadRecord(record_id, "an evaluation record must end with the reference answer", kind="turns")
            answer = messages[-1]["content"]
            if not answer.strip():
                raise BadRecord(record_id, f"turn {len(messages) - 1} is an empty assistant turn (the reference "
                                           "answer)", kind="turns")
            messages = messages[:-1]
            if answer_prompt:
                messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n{answer_prompt}"}
        rendered = render_conversation(messages, template, tokenizer, num_image_tokens=num_image_tokens,
                                       max_length=max_length, record_id=record_id,
                                       add_generation_prompt=mode == "prompt")
        # int32 arrays, not lists of Python ints: about 7x less memory per token for the index of a large set
        return Example(str(record_id), np.asarray(rendered.input_ids, dtype=np.int32),
                       np.asarray(rendered.labels, dtype=np.int32), [], answer, states), images

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    def pixels(self, image_indices) -> torch.Tensor:
        """Decode and transform the given images: (n, 3, H, W). A file that changed or broke since its header
        was read is a BadRecord naming the record that uses it."""
        indices = [int(i) for i in image_indices]
        try:
            tensors = [self.transform(load_image(self.images[i], self.image_owners[i], transform=self.transform))
                       for i in indices]
        except BadRecord as error:
            raise BadRecord(error.record_id, error.reason, error.kind, self.source) from None
        return torch.stack(tensors) if tensors else torch.zeros(0)

    @property
    def pixel_values(self) -> torch.Tensor:
        """Every image decoded at once (small data sets, tests); training reads batches through a loader."""
        return self.pixels(range(len(self.images)))


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_indices: torch.Tensor  # (num_images,) indices into dataset.images, in sample order
    image_counts: list[int]
    record_ids: list[str]
    pixel_values: torch.Tensor | None = None  # the batch's images, when the loader decoded them
    text_inputs: dict | None = None  # the connector's own tokens of the batch's text, when the loader made them
    states: dict | None = None  # PaLM-E: {kind: (n, width)} state vectors of the batch, in sample order


def collate(examples: list[Example], pad_token_id: int, padding_side: str = "right") -> Batch:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.as_tensor(example.input_ids)
        labels[row, span] = torch.as_tensor(example.labels)
        attention_mask[row, span] = 1
    image_indices = torch.tensor([i for e in examples for i in e.image_indices], dtype=torch.long)
    return Batch(input_ids, attention_mask, labels, image_indices, [len(e.image_indices) for e in examples],
                 [e.record_id for e in examples], states=collate_states(examples))


def collate_states(examples) -> dict | None:
    """The state vectors of `examples` (anything with `.states`: examples, the server's jobs), kind by kind, in
    their order, as (n, width) tensors; None when none has any."""
    kinds = dict.fromkeys(kind for e in examples for kind in (e.states or {}))
    if not kinds:
        return None
    return {kind: torch.cat([torch.as_tensor(e.states[kind]) for e in examples if e.states and kind in e.states])
            for kind in kinds}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 16,
                           indices: list[int] | None = None) -> list[list[int]]:
    """Shuffled batches of similar length (less padding): shuffle, sort within chunks of `group` batches.
    `indices` (default: all) are the samples to batch; a mixture's epoch may repeat some and leave others."""
    rng = random.Random(seed)
    order = list(range(len(lengths))) if indices is None else list(indices)
    rng.shuffle(order)
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Mixture:
    """Example ranges of a concatenated dataset, one per source, with their weights."""
    names: list[str]
    ranges: list[tuple[int, int]]
    weights: list[float]

    @classmethod
    def single(cls, name: str, size: int) -> "Mixture":
        return cls([name], [(0, size)], [1.0])

    def epoch(self, seed: int, epoch: int) -> list[int]:
        """The example indices one epoch samples (unordered: the loop shuffles and groups them)."""
        rng = random.Random(f"{seed}:{epoch}")
        indices = []
        for (start, end), weight in zip(self.ranges, self.weights):
            copies, extra = _draws(weight, end - start)
            for _ in range(copies):
                indices.extend(range(start, end))
            indices.extend(rng.sample(range(start, end), extra))
        return indices

    def per_source(self) -> dict[str, int]:
        """Samples each source contributes to one epoch."""
        out = {}
        for name, (start, end), weight in zip(self.names, self.ranges, self.weights):
            copies, extra = _draws(weight, end - start)
            out[name] = out.get(name, 0) + copies * (end - start) + extra
        return out

    def epoch_size(self) -> int:
        return sum(self.per_source().values())


def _draws(weight: float, size: int) -> tuple[int, int]:
    """Whole passes over a source of `size` records at `weight`, and the records drawn beyond them."""
    copies = int(weight)
    return copies, min(size, round((weight - copies) * size))
