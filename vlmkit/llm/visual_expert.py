"""CogVLM's visual expert, on a transformers decoder (Llama and its kin) as it is.

Every decoder layer gets a second copy of its attention's q/k/v and output projections and of its whole MLP,
initialised as copies of the layer's own (THUDM's `VisionExpertAttention` / `VisionExpertMLP`); the norms, the
attention itself (softmax over every token, RoPE), the embeddings and the LM head stay shared. A token whose entry
in the routing mask is set goes through the expert copies, every other token through the LLM's own weights.

The layers are not copied or subclassed: each routed module keeps its class and its parameters' names (a Llama
checkpoint's keys are unchanged), and its `forward` is replaced on the instance by one that splits the rows by the
mask. The experts live apart, in `LanguageModel.experts` (one ModuleDict per layer: q_proj, k_proj, v_proj, o_proj,
mlp), so a stage trains them as the part `llm.experts`. The mask for the forward about to run is put on a shared
`Route` by the wrapper (`LanguageModel._routing`); it stays there until the next forward, so a layer recomputed in
the backward pass (gradient checkpointing) routes its rows as the forward did. Which tokens are routed — an image's
tokens but its last (the end-of-image vector), never a lone decode step — is the model's rule
(`VisionLanguageModel.routing_mask`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

ROUTED_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class Route:
    """The routing mask (B, T) of the forward running now, shared by every routed module of one LLM. Whether it
    routes none, some or all rows is read once when it is set, not in every routed module (on a GPU each read is a
    device-to-host sync: five per layer otherwise)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.kind = "none"

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        routed = int(mask.sum()) if mask is not None else 0
        self.kind = "none" if not routed else "all" if routed == mask.numel() else "some"


def routed_forward(language_forward, expert: nn.Module, route: Route):
    """A forward that sends the rows the route marks through `expert` and the others through `language_forward`,
    each row through one of them only."""

    def forward(x):
        mask = route.mask
        if route.kind == "none" or tuple(mask.shape) != tuple(x.shape[:-1]):
            return language_forward(x)
        if route.kind == "all":
            return expert(x)
        keep = ~mask
        language, vision = language_forward(x[keep]), expert(x[mask])
        out = language.new_empty(*mask.shape, language.shape[-1])
        out[keep] = language
        out[mask] = vision.to(language.dtype)
        return out

    return forward


def add_visual_experts(causal_lm: nn.Module, route: Route) -> nn.ModuleList:
    """Give every decoder layer of `causal_lm` its visual expert (copies of its q/k/v/o projections and MLP) and
    route its modules by `route`; returns the experts, one ModuleDict per layer."""
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if not layers:
        raise TypeError(f"{type(causal_lm).__name__}: no decoder layers (`.layers`) to give visual experts")
    experts = nn.ModuleList()
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        missing = [name for name in ROUTED_ATTENTION if not isinstance(getattr(attention, name, None), nn.Linear)]
        if missing:
            raise TypeError(f"{type(layer).__name__}: its attention has no {', '.join(missing)} Linear; a visual expert "
                            "needs separate q/k/v/o projections (Llama's layout)")
        expert = nn.ModuleDict({name: copy.deepcopy(getattr(attention, name)) for name in ROUTED_ATTENTION})
        expert["mlp"] = copy.deepcopy(mlp)
        for name in ROUTED_ATTENTION:
            module = getattr(attention, name)
            module.forward = routed_forward(module.forward, expert[name], route)
        mlp.forward = routed_forward(mlp.forward, expert["mlp"], route)
        experts.append(expert)
    return experts
