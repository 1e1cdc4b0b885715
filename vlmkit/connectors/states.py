"""PaLM-E's state encoders: each kind of continuous observation (an object's pose, size and colour) gets an MLP
into the LLM's embedding space, and its vectors fill that kind's placeholder tokens in the text (`<obj>`), one
token per vector, at ordinary consecutive positions (Driess et al., 2023, "state estimation" inputs)."""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.errors import BadRecord


def placeholder(kind: str) -> str:
    """The text token a state of `kind` fills: `<obj>`."""
    return f"<{kind}>"


class StateEncoders(nn.Module):
    """One MLP per state kind: Linear(width -> hidden) -> GELU -> Linear(hidden -> LLM width)."""

    def __init__(self, kinds: dict[str, int], llm_hidden: int, hidden: int = 0):
        super().__init__()
        self.widths = dict(kinds)
        hidden = hidden or llm_hidden
        self.encoders = nn.ModuleDict({kind: nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                                           nn.Linear(hidden, llm_hidden))
                                       for kind, width in kinds.items()})

    def forward(self, kind: str, values: torch.Tensor) -> torch.Tensor:
        weight = self.encoders[kind][0].weight
        return self.encoders[kind](values.to(device=weight.device, dtype=weight.dtype))

    def splice(self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_ids: dict[str, int],
               states: dict[str, torch.Tensor] | None, record_ids=None) -> torch.Tensor:
        """Put each kind's vectors (n, width), in sample order, into its placeholder positions; the counts must
        match (a clear error naming the sample otherwise)."""
        states = states or {}
        for kind, token in token_ids.items():
            mask = input_ids == token
            values = states.get(kind)
            found = int(mask.sum())
            given = 0 if values is None else int(values.shape[0])
            if found != given:
                per_row = mask.sum(1).tolist()
                row = next((i for i, n in enumerate(per_row) if n), 0)
                name = record_ids[row] if record_ids is not None else row
                raise BadRecord(name, f"the batch has {found} <{kind}> placeholder(s) but {given} {kind} state "
                                      "vector(s)", kind="state_count")
            if not found:
                continue
            embeds = self(kind, values).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), embeds)
        return inputs_embeds

    def keep_in_graph(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """A batch without states in training: every encoder runs on nothing, so its parameters get a (zero)
        gradient this step (DDP expects every trained parameter to take part)."""
        for kind, width in self.widths.items():
            weight = self.encoders[kind][0].weight
            inputs_embeds = inputs_embeds + self(kind, weight.new_zeros(0, width)).sum().to(inputs_embeds.dtype)
        return inputs_embeds
