"""Bits per byte: a loss that does not depend on the tokenizer's vocabulary size.

Summed cross-entropy (nats) over target tokens divided by ln(2) times the UTF-8 bytes those tokens
spell. Special tokens (0 bytes) and ignored targets (-1) are left out of both sums. Under a process
group both sums are added up over the ranks, so each rank evaluates only its share of the batches.
An evaluation reads at most one pass over its split (`eval_steps`): never the same tokens twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from nanochat.distributed import all_reduce_sum
from nanochat.errors import UsageError
from nanochat.precision import PrecisionPlan
from nanochat.runlog import progress_bar
from nanochat.shardfs import Source, num_row_groups, read_row_group
from nanochat.tokenizer import Tokenizer


def split_tokens(shards: Sequence[Source], tokenizer: Tokenizer, limit: int) -> int:
    """Tokens in the stream the DataLoader packs from `shards` (each document BOS-prefixed), counted
    row group by row group until `limit` is reached: past it the count is a lower bound, not the split's."""
    count = 0
    for shard in shards:
        for group in range(num_row_groups(shard)):
            if count >= limit:
                return count
            docs = read_row_group(shard, group)
            count += sum(len(ids) for ids in tokenizer.encode(docs, prepend=tokenizer.bos_token_id))
    return count


def eval_steps(eval_tokens: int, batch_size: int, seq_len: int, shards: Sequence[Source], tokenizer: Tokenizer,
               split: str = "validation", verbose: bool = True) -> tuple[int, int]:
    """(steps, rows): batches of rows x seq_len that an evaluation of `eval_tokens` reads: as many as asked
    (at least one), but no more than one pass over the split holds (the loader would start it over and
    count the same tokens twice). rows = batch_size, or fewer for a split smaller than one batch (a small
    corpus on a big GPU). Says so when it caps (`verbose`: the main process of a group)."""
    row = seq_len + 1  # a row is T + 1 tokens: the inputs and the shifted targets
    held = split_tokens(shards, tokenizer, max(1, eval_tokens // (batch_size * seq_len)) * batch_size * row)
    rows = min(batch_size, held // row)
    if rows == 0:
        raise UsageError(
            f"the {split} split ({', '.join(str(s) for s in shards)}) holds {held:,} tokens, fewer than one row of "
            f"{row}: lower --max-seq-len, or build the shards with more validation documents "
            "(python -m nanochat.dataset build --val-docs N)")
    asked = max(1, eval_tokens // (rows * seq_len))
    steps = min(asked, held // (rows * row))
    if steps < asked and verbose:
        print(f"eval: --eval-tokens {eval_tokens:,} > the {split} split's {held:,} tokens: evaluating "
              f"{steps * rows * seq_len:,} ({steps} batches of {rows} x {seq_len})", flush=True)
    return steps, rows


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module, plan: PrecisionPlan, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
    token_bytes: torch.Tensor, progress: str = "",
) -> float:
    """Bits per byte over `steps` batches drawn from `batches`; a progress bar named `progress` when given
    (one process of a group shows it).

    Collective under a process group: each rank passes its own share of the batches (its own `steps`,
    0 allowed) and every rank returns the bits per byte of all of them."""
    token_bytes = token_bytes.to(next(model.parameters()).device)
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    was_training = model.training
    model.eval()
    # on the training bar's line while it runs (position 0: a nested bar would move the cursor), gone when done
    bar = progress_bar(total=steps, desc=progress, unit="batch", dynamic_ncols=True, leave=False, position=0,
                       disable=not progress)
    for _ in range(steps):
        x, y = next(batches)
        with plan.compute_context():
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        counted = token_bytes[y.clamp(min=0)] * (y >= 0)
        nats += (loss.double() * (counted > 0)).sum()
        nbytes += counted.sum()
        bar.update(1)
    bar.close()
    model.train(was_training)
    all_reduce_sum(nats)
    all_reduce_sum(nbytes)
    if nbytes.item() == 0:
        raise ValueError("evaluate_bpb: the batches held no byte-carrying target tokens")
    return (nats / (math.log(2) * nbytes)).item()
