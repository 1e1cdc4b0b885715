"""Generation on token ids: greedy or sampling (temperature, top-p), batched with left padding.

The prompt (text with image features spliced in) is run once to fill the KV cache; each new token is then
a one-position forward. `use_cache=False` recomputes the whole sequence every step (for tests and
debugging); both give the same tokens under greedy decoding.
"""
from __future__ import annotations

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


@torch.no_grad()
def generate(model, prompts: list[list[int]], image_counts: list[int] | None = None, pixel_values=None,
             vision_features=None, config: GenerationConfig | None = None, stop_ids: set[int] | None = None,
             record_ids=None) -> list[list[int]]:
    """Generate continuations for token-id prompts; returns the new tokens of each (stop token excluded)."""
    config = config or GenerationConfig()
    tokenizer = model.tokenizer
    stop_ids = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    inputs_embeds, _ = model.embed(input_ids, image_counts, pixel_values, vision_features, record_ids)
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs = [[] for _ in range(batch)]
    cache = None
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_embeds, step_positions = inputs_embeds, position_ids
    for _ in range(config.max_new_tokens):
        if config.use_cache:
            logits, cache = model.llm(step_embeds, attention_mask=attention_mask, position_ids=step_positions,
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            logits, _ = model.llm(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  logits_to_keep=1)
        next_tokens = sample_next(logits[:, -1], config.temperature, config.top_p, generator)
        for row in range(batch):
            if not finished[row]:
                token = int(next_tokens[row])
                if token in stop_ids:
                    finished[row] = True
                else:
                    outputs[row].append(token)
        if finished.all():
            break
        next_tokens = next_tokens.masked_fill(finished, tokenizer.pad_token_id)
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
