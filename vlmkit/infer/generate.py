"""Generation on token ids: greedy or sampling (temperature, top-p), batched with left padding.

The prompt (text with image features spliced in) is run once to fill the KV cache; each new token is then
a one-position forward. `use_cache=False` recomputes the whole sequence every step (for tests and
debugging); both give the same tokens under greedy decoding.

A batch may mix requests: `row_configs` gives each row its own token budget, temperature, top-p and seed
(the server batches unrelated requests), and `on_token(row, token)` sees each token as it is made (streaming;
returning True ends that row, e.g. on a stop string or a closed connection).

What ends an answer is the model's template's stop resolved against its tokenizer (`model_stop`): its EOS, a
named special token such as `<|im_end|>`, or a string such as `###` (found in the decoded tail of each row,
and cut from the answer by `decode_answer`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlmkit.data.boxes import MARKUP_TOKENS
from vlmkit.data.templates import get_template, resolve_stop


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    use_cache: bool = True
    seed: int | None = None


def model_stop(model):
    """The StopSpec of `model`'s template for its tokenizer (ids and strings that end an answer)."""
    cached = getattr(model, "_stop_spec", None)
    key = (model.config.template, len(model.tokenizer))
    if cached is None or cached[0] != key:
        cached = (key, resolve_stop(get_template(model.config.template), model.tokenizer))
        model._stop_spec = cached
    return cached[1]


def _control_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens that are not answer text: all of them but the box markup."""
    cached = getattr(tokenizer, "_vlmkit_control_ids", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]

    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    vocab = tokenizer.get_vocab()
    ids = frozenset(special - {vocab[t] for t in MARKUP_TOKENS if t in vocab})
    tokenizer._vlmkit_control_ids = (len(tokenizer), ids)
    return ids


def decode_text(tokenizer, tokens: list[int]) -> str:
    """Generated tokens as text: the control tokens (BOS, EOS, padding, the image placeholder, a template's turn
    markers) dropped, the special tokens an answer is made of kept (Qwen-VL's <ref>…</ref><box>…</box>: with
    `skip_special_tokens=True` its boxes would lose their tags and parse as nothing)."""
    control = _control_ids(tokenizer)
    return tokenizer.decode([t for t in tokens if t not in control], skip_special_tokens=False)


def decode_answer(model, tokens: list[int]) -> str:
    """The text of generated tokens (decode_text), without a stop string or what follows it."""
    return model_stop(model).cut(decode_text(model.tokenizer, tokens)).strip()


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        keep[..., 0] = True  # the most likely token, even when top_p is below float32's resolution
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    probs = (probs / probs.sum(-1, keepdim=True)).cpu()  # the seeded generator lives on the CPU
    if not torch.isfinite(probs).all():
        raise ValueError(f"sampling at temperature {temperature} gave non-finite probabilities (the logits were "
                         "not finite, or the temperature too small for float32)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class Row:
    """One sequence being decoded: its settings, its tokens so far, and who hears about each new one."""
    config: GenerationConfig
    generator: torch.Generator | None = None
    on_token: Callable[[int], bool] | None = None  # True: this row needs no more tokens
    tokens: list[int] | None = None
    finished: bool = False
    error: Exception | None = None  # sampling failed for this row alone: it finished with this error

    def __post_init__(self):
        self.tokens = [] if self.tokens is None else self.tokens


def _dynamic_layers(cache) -> list | None:
    """The cache's per-layer K/V holders when every layer is a plain growing one (rows can be padded and
    joined); None for sliding-window, static or quantised caches."""
    from transformers.cache_utils import DynamicLayer  # start-up: transformers, 0.76 s

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


def _left_pad_time(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Decoder:
    """Rows decoded together, which may join and leave between steps (continuous batching).

    State between steps: the KV cache holds every row's sequence except its pending token (the one sampled
    last, fed at the next step), left-padded to a common length with `mask` 0 on the padding; the positions are
    the model's (`model.position_ids` of the mask), and every forward is the model's `decode` / `decode_step`.
    `add` prefills new rows (one left-padded forward) and merges them in; `step` feeds every pending token and
    samples the next; `drop_finished` removes finished rows from the cache. `generate()` is one `add` and steps until all rows finish. With `use_cache=False` the
    whole sequence is recomputed every step (tests, debugging) and rows cannot join later.

    An encoder-decoder LLM (Flan-T5): `add` runs the prompts through the encoder once and starts each row's
    decoder at the start token; `step` extends the decoder (its own KV cache, against the encoder's states).
    Rows leave as they finish; new rows cannot join a running batch (their encoder states would need padding).
    """

    def __init__(self, model, stop_ids: set[int] | None = None, use_cache: bool = True,
                 stop_strings: tuple[str, ...] | None = None):
        """`stop_ids` / `stop_strings` default to the model's template stop (`model_stop`)."""
        model.require_llm("generation")
        self.model = model
        stop = model_stop(model) if stop_ids is None or stop_strings is None else None
        self.stop_ids = set(stop_ids if stop_ids is not None else stop.ids)
        self.stop_strings = tuple(stop_strings if stop_strings is not None else stop.strings)
        # a stop string of n characters lies within the last 4n + 4 tokens (a token is at least one byte)
        self._tail = max((4 * len(s) + 4 for s in self.stop_strings), default=0)
        self.use_cache = use_cache
        self.rows: list[Row] = []
        self.cache = None
        self.embeds = None      # use_cache=False: the whole sequence so far
        self.mask = None        # (rows, cached length)
        self.image_mask = None  # (rows, cached length): which positions are image tokens (the model's to read)
        self.pending = None     # (rows,) the token to feed next
        self.seq2seq = model.llm.is_encoder_decoder
        self.encoder = None     # encoder-decoder: (encoder states (rows, S, D), encoder mask (rows, S))
        self.decoded = None     # encoder-decoder with use_cache=False: each row's decoder ids so far

    @property
    def can_join(self) -> bool:
        """Whether rows can be added now (no rows yet, or a cache whose rows can be padded and joined)."""
        return not self.rows or (self.use_cache and not self.seq2seq and _dynamic_layers(self.cache) is not None)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, prompts: list[list[int]], rows: list[Row], image_counts=None, pixel_values=None,
            vision_features=None, record_ids=None, states=None) -> None:
        """Prefill `prompts` (token ids with image placeholders, and state placeholders that `states` fill) and
        join their rows to the batch."""
        if not self.can_join:
            raise RuntimeError("rows cannot join this batch now (cache layout, or use_cache=False)")
        model, device = self.model, self.model.device
        input_ids, mask = left_pad(prompts, model.tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        embeds, image_mask = model.embed(input_ids, image_counts, pixel_values, vision_features, record_ids,
                                         states=states)
        if self.seq2seq:
            self._start_decoder(embeds, mask, rows)
            return
        logits, cache = model.decode(embeds, mask, image_token_mask=image_mask, use_cache=self.use_cache)
        pending = self._sample(logits[:, -1], rows)
        if not self.rows:
            self.cache, self.embeds, self.mask, self.pending = cache, embeds, mask, pending
            self.image_mask = image_mask
        else:  # merge: left-pad the shorter side's cache and mask to the longer one, stack the rows
            length = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(_dynamic_layers(self.cache), _dynamic_layers(cache)):
                old.keys = torch.cat([_left_pad_time(old.keys, length, 2), _left_pad_time(new.keys, length, 2)])
                old.values = torch.cat([_left_pad_time(old.values, length, 2),
                                        _left_pad_time(new.values, length, 2)])
            self.mask = torch.cat([_left_pad_time(self.mask, length, 1), _left_pad_time(mask, length, 1)])
            self.image_mask = torch.cat([_left_pad_time(self.image_mask, length, 1),
                                         _left_pad_time(image_mask, length, 1)])
            self.pending = torch.cat([self.pending, pending])
        self.rows.extend(rows)
        self._take(rows, pending)

    @torch.no_grad()
    def add_with_prefix(self, prefix_ids: torch.Tensor, owners: list[int], suffixes: list[list[int]], rows: list[Row],
                        pixel_values=None, vision_features=None) -> None:
        """Start the batch from shared prefixes: `prefix_ids` (P, L) are prompts' common starts, each ending in
        one image (e.g. system text + the image's tokens), run once each; row i continues prefix `owners[i]`
        with `suffixes[i]` (its question, no image). Evaluation asks ~10 questions per image, so this runs the
        long shared part once per image instead of once per question; the result is the same as `add` on the
        whole prompts (same positions and mask; the suffixes' left padding sits between prefix and suffix)."""
        if self.rows or not self.use_cache:
            raise RuntimeError("add_with_prefix starts a fresh batch with a KV cache")
        if getattr(self.model.connector, "reads_instruction", False):
            raise RuntimeError("the connector reads each prompt's question: its image tokens have no shared prefix")
        if self.seq2seq:
            raise RuntimeError("an encoder-decoder LLM's encoder reads the whole prompt at once: no prefix to share")
        model, device = self.model, self.model.device
        prefix_ids = prefix_ids.to(device)
        embeds, image_mask = model.embed(prefix_ids, [1] * len(prefix_ids), pixel_values, vision_features)
        ones = torch.ones_like(prefix_ids)
        _, cache = model.decode(embeds, ones, image_token_mask=image_mask)
        index = torch.tensor(owners, dtype=torch.long, device=device)
        cache.batch_select_indices(index)  # each row its prefix's keys and values (any cache layout)
        suffix_ids, suffix_mask = left_pad(suffixes, model.tokenizer.pad_token_id)
        suffix_ids, suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
        mask = torch.cat([ones[index], suffix_mask], dim=1)  # the suffixes' padding sits after the prefix
        image_mask = torch.cat([image_mask[index], torch.zeros_like(suffix_ids, dtype=torch.bool)], dim=1)
        logits, cache = model.decode(model.llm.embed(suffix_ids), mask, cache, image_token_mask=image_mask)
        self.cache, self.mask, self.image_mask = cache, mask, image_mask
        self.pending = self._sample(logits[:, -1], rows)
        self.rows = list(rows)
        self._take(rows, self.pending)

    def _start_decoder(self, embeds: torch.Tensor, mask: torch.Tensor, rows: list[Row]) -> None:
        llm = self.model.llm
        hidden = llm.encode(embeds, mask)
        start = torch.full((len(rows), 1), llm.decoder_start_token_id, dtype=torch.long, device=mask.device)
        logits, cache = llm.decode(start, hidden, mask, use_cache=self.use_cache)
        self.encoder, self.cache = (hidden, mask), cache
        self.decoded = start if not self.use_cache else None
        self.pending = self._sample(logits[:, -1], rows)
        self.rows = list(rows)
        self._take(rows, self.pending)

    def _step_decoder(self, fed: torch.Tensor) -> None:
        llm = self.model.llm
        hidden, mask = self.encoder
        if self.use_cache:
            logits, self.cache = llm.decode(fed[:, None], hidden, mask, past_key_values=self.cache, use_cache=True)
        else:
            self.decoded = torch.cat([self.decoded, fed[:, None]], dim=1)
            logits, _ = llm.decode(self.decoded, hidden, mask)
        self.pending = self._sample(logits[:, -1], self.rows)
        self._take(self.rows, self.pending)

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row's pending token and sample the next one."""
        model = self.model
        fed = self.pending.masked_fill(torch.tensor([r.finished for r in self.rows], device=self.pending.device),
                                       model.tokenizer.pad_token_id)
        if self.seq2seq:
            self._step_decoder(fed)
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.image_mask = torch.cat([self.image_mask, torch.zeros_like(fed[:, None], dtype=torch.bool)], dim=1)
        if self.use_cache:
            logits, self.cache = model.decode_step(fed, self.mask, self.cache, self.image_mask)
        else:
            self.embeds = torch.cat([self.embeds, model.llm.embed(fed[:, None])], dim=1)
            logits, _ = model.decode(self.embeds, self.mask, image_token_mask=self.image_mask, use_cache=False)
        self.pending = self._sample(logits[:, -1], self.rows)
        self._take(self.rows, self.pending)

    def drop_finished(self) -> list[Row]:
        """Remove finished rows (cache, mask, positions), trimming padding no row needs; returns them."""
        done = [row for row in self.rows if row.finished]
        if not done:
            return []
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.embeds = self.image_mask = self.mask = self.pending = self.encoder = self.decoded = None
            return done
        if self.seq2seq:
            index = torch.tensor(keep, device=self.pending.device)
            self.pending = self.pending[index]
            self.encoder = tuple(part[index] for part in self.encoder)
            if self.use_cache:
                self.cache.batch_select_indices(index)
            else:
                self.decoded = self.decoded[index]
            return done
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.image_mask, self.pending = self.mask[index], self.image_mask[index], self.pending[index]
        layers = _dynamic_layers(self.cache) if self.use_cache else None
        if self.use_cache and layers is None:
            self.cache.batch_select_indices(index)  # other cache layouts: select rows, keep the length
            return done
        start = int(self.mask.any(0).long().argmax())  # leading columns that are padding in every kept row
        self.mask, self.image_mask = self.mask[:, start:], self.image_mask[:, start:]
        if layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        else:
            self.embeds = self.embeds[index, start:]
        return done

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.config.temperature > 0 and not row.finished:
                try:
                    tokens[i] = sample_next(logits[i:i + 1], row.config.temperature, row.config.top_p,
                                            row.generator)[0]
                except (ValueError, RuntimeError) as exc:  # this row's settings or logits: it alone ends
                    row.error, row.finished = exc, True
        return tokens

    def _take(self, rows: list[Row], tokens: torch.Tensor) -> None:
        for row, token in zip(rows, tokens.tolist()):
            if row.finished:
                continue
            if token in self.stop_ids:
                row.finished = True
                continue
            row.tokens.append(token)
            if (row.on_token is not None and row.on_token(token)) or len(row.tokens) >= row.config.max_new_tokens:
                row.finished = True
            elif self.stop_strings:
                tail = decode_text(self.model.tokenizer, row.tokens[-self._tail:])
                row.finished = any(stop in tail for stop in self.stop_strings)


@torch.no_grad()
def generate(model, prompts: list[list[int]], image_counts: list[int] | None = None, pixel_values=None,
             vision_features=None, config: GenerationConfig | None = None, stop_ids: set[int] | None = None,
             record_ids=None, stop_strings: tuple[str, ...] | None = None, row_configs: list[GenerationConfig] | None = None,
             on_token: Callable[[int, int], bool] | None = None,
             prefix: tuple[torch.Tensor, list[int]] | None = None, states: dict | None = None) -> list[list[int]]:
    """Generate continuations for token-id prompts; returns the new tokens of each (stop token excluded).
    `states` (PaLM-E): {kind: (n, width)} vectors for the prompts' state placeholders, in prompt order.

    With `prefix` = (prefix_ids, owners), prompt i is `prefix_ids[owners[i]]` followed by `prompts[i]`, and the
    images (`pixel_values` / `vision_features`, one per prefix row) belong to the prefixes
    (`Decoder.add_with_prefix`).

    `row_configs` (one per prompt) overrides `config`'s budget and sampling per row; `use_cache` is taken
    from `config`. `on_token(row, token)` is called for every kept token; a True return finishes the row.
    """
    config = config or GenerationConfig()
    if row_configs is not None and len(row_configs) != len(prompts):
        raise ValueError(f"{len(row_configs)} row configs for {len(prompts)} prompts")
    shared = torch.Generator().manual_seed(config.seed) if config.seed is not None and not row_configs else None
    rows = []
    for i, own in enumerate(row_configs or [config] * len(prompts)):
        generator = shared if not row_configs else (torch.Generator().manual_seed(own.seed)
                                                    if own.seed is not None else None)
        callback = (lambda token, i=i: on_token(i, token)) if on_token is not None else None
        rows.append(Row(own, generator, callback, finished=own.max_new_tokens <= 0))
    decoder = Decoder(model, stop_ids, config.use_cache,
                      stop_strings=() if stop_ids is not None and stop_strings is None else stop_strings)
    if prefix is not None:
        prefix_ids, owners = prefix
        decoder.add_with_prefix(prefix_ids, owners, prompts, rows, pixel_values, vision_features)
    else:
        decoder.add(prompts, rows, image_counts, pixel_values, vision_features, record_ids, states)
    while not all(row.finished for row in rows):
        decoder.step()
    for row in rows:
        if row.error is not None:
            raise row.error
    return [row.tokens for row in rows]
