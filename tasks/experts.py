"""Mixture-of-experts layers with one `nn.Linear` per expert and projection.

transformers 5 stores the experts of a Qwen3-MoE layer as two stacked parameters, `mlp.experts.gate_up_proj`
[experts, 2 * intermediate, hidden] (gate rows first, then up) and `mlp.experts.down_proj` [experts, hidden,
intermediate], while checkpoints on the hub (and transformers' own `save_pretrained`) keep one tensor per
expert, `mlp.experts.<e>.gate_proj.weight` and so on. The pipeline works on the unstacked form: it is what
the bit map names (`12.mlp.experts.3.down_proj`), what HQQ can replace linear by linear, and what the
profiler hooks. `UnstackedExperts` computes exactly what transformers' stacked module computes (same
routing, same per-expert order of operations), so swapping one for the other changes no number beyond
float rounding.
"""

from __future__ import annotations

import re

import torch
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"^(.*experts)\.(gate_up_proj|down_proj)$")
# Mixtral's checkpoints (written by transformers 4, or by transformers 5, which converts back on save) name
# the MoE block `block_sparse_moe` and an expert's projections w1 (gate), w3 (up) and w2 (down).
_MIXTRAL_EXPERT = re.compile(r"^(.*)block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _mixtral_name(key: str) -> str:
    match = _MIXTRAL_EXPERT.match(key)
    if match:
        prefix, expert, w = match.groups()
        return f"{prefix}mlp.experts.{expert}.{_MIXTRAL_PROJECTION[w]}.weight"
    return key.replace("block_sparse_moe.", "mlp.")


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnstackedExperts(nn.ModuleList):
    """Drop-in for transformers' stacked experts module: forward(hidden [tokens, hidden], top_k_index,
    top_k_weights [tokens, k]) -> the routing-weighted sum of the chosen experts' outputs. An expert no
    token is routed to is not called (its hooks do not fire)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn):
        super().__init__(Expert(hidden, intermediate, act_fn) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(top_k_index.t() == e)  # transformers' order: by rank, then token
            if token_idx.numel() == 0:
                continue
            out = expert(hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def is_stacked_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and getattr(module, "gate_up_proj").dim() == 3


def unstack_experts(model: nn.Module) -> int:
    """Replace every stacked experts module of `model` with an `UnstackedExperts` holding the same weights
    (views on the meta device stay on it); returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_stacked_experts(module):
            continue
        experts, twice, hidden = module.gate_up_proj.shape
        half = twice // 2
        with torch.device("meta"):  # no initialization of weights that are assigned next
            new = UnstackedExperts(experts, hidden, half, module.act_fn)
        if module.gate_up_proj.device.type != "meta":
            for e, expert in enumerate(new):  # own copies, so the stacked tensors are freed with their module
                for linear, weight in ((expert.gate_proj, module.gate_up_proj[e, :half]),
                                       (expert.up_proj, module.gate_up_proj[e, half:]), (expert.down_proj, module.down_proj[e])):
                    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        model.set_submodule(name, new)
        replaced += 1
    return replaced


def unstack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its experts under the pipeline's names: stacked expert tensors
    (`...experts.gate_up_proj`) rewritten to per-expert keys (`...experts.<e>.gate_proj.weight`), and
    Mixtral's checkpoint names (`block_sparse_moe.experts.<e>.w1/w3/w2`, `block_sparse_moe.gate`) to the
    ones transformers 5's module tree uses (`mlp.experts.<e>.gate_proj/up_proj/down_proj`, `mlp.gate`).
    A state dict without either is returned as it is."""
    if any(k.startswith("block_sparse_moe.") or ".block_sparse_moe." in k for k in state):
        state = {_mixtral_name(k): v for k, v in state.items()}
    if not any(_STACKED.match(k) for k in state):
        return state
    out = {}
    for key, value in state.items():
        match = _STACKED.match(key)
        if not match:
            out[key] = value
            continue
        prefix, kind = match.groups()
        for e in range(value.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = value[e]
            else:
                half = value.shape[1] // 2
                out[f"{prefix}.{e}.gate_proj.weight"] = value[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = value[e, half:]
    return out
