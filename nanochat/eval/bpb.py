"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size.

Summed cross-entropy (nats) over target tokens divided by ln(2) times the UTF-8 bytes those tokens
spell. Special tokens (0 bytes) and ignored targets (-1) are left out of both sums. Under a process
group both sums are added up over the ranks, so each rank evaluates only its share of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from nanochat.distributed import all_reduce_sum
from nanochat.precision import PrecisionPlan


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module, plan: PrecisionPlan, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, token_bytes: torch.Tensor
) -> float:
    """Bits per byte over `steps` batches drawn from `batches`.

    Collective under a process group: each rank passes its own share of the batches (its own `steps`,
    0 allowed) and every rank returns the bits per byte of all of them."""
    token_bytes = token_bytes.to(next(model.parameters()).device)
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        x, y = next(batches)
        with plan.compute_context():
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        counted = token_bytes[y.clamp(min=0)] * (y >= 0)
        nats += (loss.double() * (counted > 0)).sum()
        nbytes += counted.sum()
    model.train(was_training)
    all_reduce_sum(nats)
    all_reduce_sum(nbytes)
    if nbytes.item() == 0:
        raise ValueError("evaluate_bpb: the batches held no byte-carrying target tokens")
    return (nats / (math.log(2) * nbytes)).item()
