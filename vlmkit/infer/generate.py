"""Generation on token ids: greedy or sampling (temperature, top-p), batched with left padding.

The prompt (text with image features spliced in) is run once to fill the KV cache; each new token is then
a one-position forward. `use_cache=False` recomputes the whole sequence every step (for tests and
debugging); both give the same tokens under greedy decoding.

A batch may mix requests: `row_configs` gives each row its own token budget, temperature, top-p and seed
(the server batches unrelated requests), and `on_token(row, token)` sees each token as it is made (streaming;
returning True ends that row, e.g. on a stop string or a closed connection).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    use_cache: bool = True
    seed: int | None = None


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
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    probs = (probs / probs.sum(-1, keepdim=True)).cpu()  # the seeded generator lives on the CPU
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def _sample_rows(logits: torch.Tensor, configs: list[GenerationConfig] | None, generators: list,
                 config: GenerationConfig) -> torch.Tensor:
    """Next token of each row: one draw for the batch under `config`, or each row under its own settings."""
    if configs is None:
        return sample_next(logits, config.temperature, config.top_p, generators[0])
    tokens = logits.argmax(-1)
    for row, own in enumerate(configs):
        if own.temperature > 0:
            tokens[row] = sample_next(logits[row:row + 1], own.temperature, own.top_p, generators[row])[0]
    return tokens


@torch.no_grad()
def generate(model, prompts: list[list[int]], image_counts: list[int] | None = None, pixel_values=None,
             vision_features=None, config: GenerationConfig | None = None, stop_ids: set[int] | None = None,
             record_ids=None, row_configs: list[GenerationConfig] | None = None,
             on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Generate continuations for token-id prompts; returns the new tokens of each (stop token excluded).

    `row_configs` (one per prompt) overrides `config`'s budget and sampling per row; `use_cache` is taken
    from `config`. `on_token(row, token)` is called for every kept token; a True return finishes the row.
    """
    config = config or GenerationConfig()
    tokenizer = model.tokenizer
    stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    batch = len(prompts)
    if row_configs is not None and len(row_configs) != batch:
        raise ValueError(f"{len(row_configs)} row configs for {batch} prompts")
    generators = [torch.Generator().manual_seed(c.seed) if c.seed is not None else None
                  for c in (row_configs or [config])]
    budgets = [c.max_new_tokens for c in row_configs] if row_configs else [config.max_new_tokens] * batch
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    inputs_embeds, _ = model.embed(input_ids, image_counts, pixel_values, vision_features, record_ids)
    finished = [budget <= 0 for budget in budgets]
    outputs = [[] for _ in range(batch)]
    cache = None
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_embeds, step_positions = inputs_embeds, position_ids
    for _ in range(max(budgets, default=0)):
        if all(finished):
            break
        if config.use_cache:
            logits, cache = model.llm(step_embeds, attention_mask=attention_mask, position_ids=step_positions,
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            logits, _ = model.llm(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  logits_to_keep=1)
        next_tokens = _sample_rows(logits[:, -1], row_configs, generators, config)
        for row, token in enumerate(next_tokens.tolist()):
            if finished[row]:
                continue
            if token in stop_ids:
                finished[row] = True
                continue
            outputs[row].append(token)
            if (on_token is not None and on_token(row, token)) or len(outputs[row]) >= budgets[row]:
                finished[row] = True
        if all(finished):
            break
        done = torch.tensor(finished, device=device)
        next_tokens = next_tokens.masked_fill(done, tokenizer.pad_token_id)
        new_embeds = model.llm.embed(next_tokens[:, None])
        next_positions = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        if config.use_cache:
            step_embeds, step_positions = new_embeds, next_positions
            position_ids = torch.cat([position_ids, next_positions], dim=1)
        else:
            inputs_embeds = torch.cat([inputs_embeds, new_embeds], dim=1)
            position_ids = torch.cat([position_ids, next_positions], dim=1)
    return outputs
