"""Text generation from a trained GPT.

`generate` re-runs the model over the whole (cropped) context for every new token: simple and
obviously correct, used for samples during training.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from nanochat.precision import PrecisionPlan


@torch.no_grad()
def generate(
    model: nn.Module,
    plan: PrecisionPlan,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `ids`; temperature 0 = greedy."""
    device = next(model.parameters()).device
    context_len = model.config.sequence_len
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    rng = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        with plan.compute_context():
            logits = model(tokens[:, -context_len:])[:, -1, :]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
        tokens = torch.cat([tokens, next_id], dim=1)
        yield int(next_id)
    model.train(was_training)


def sample_text(model: nn.Module, tokenizer, plan: PrecisionPlan, prompt: str, max_new_tokens: int = 32, **kwargs) -> str:
    """Decode a continuation of `prompt` (BOS-prefixed, as documents are during training)."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
    return tokenizer.decode(list(generate(model, plan, ids, max_new_tokens, **kwargs)))
