"""Alignment heads (docs/spec.md §4): linear, and the residual low-rank MLP.

MLP head: z = P x + α · W₂ Dropout(GELU(W₁ x)), P orthogonal (no bias), W₁ of rank ``rank``, W₂ zero-initialised,
α = sigmoid(gate logit).

Difference from the public code: there the gate logit starts at −∞, so α = 0, ∂z/∂W₂ = α·h = 0 and
∂z/∂W₁ = α·W₂ᵀ… = 0; the residual branch never receives a gradient and the "MLP" is the linear map P.
Here the gate starts at α = ``gate_init`` (0.1): the output at initialisation is still exactly P x (W₂ = 0),
but W₂ gets the gradient α·h from the first step, W₁ follows once W₂ ≠ 0, and α itself is learned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEADS = ("linear", "mlp")


class LinearHead(nn.Linear):
    """d_in → d_out with bias (the paper's linear head)."""


class MLPHead(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int = 64, dropout: float = 0.1, gate_init: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"gate_init must be in (0, 1), got {gate_init}")
        self.proj = nn.Linear(d_in, d_out, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        self.down = nn.Linear(d_in, rank)
        self.up = nn.Linear(rank, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act, self.drop = nn.GELU(), nn.Dropout(dropout)
        self.gate_logit = nn.Parameter(torch.tensor(math.log(gate_init / (1.0 - gate_init))))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.gate * self.up(self.drop(self.act(self.down(x))))


def build_head(kind: str, d_in: int, d_out: int, **kwargs) -> nn.Module:
    if kind == "linear":
        return LinearHead(d_in, d_out)
    if kind == "mlp":
        return MLPHead(d_in, d_out, **kwargs)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
