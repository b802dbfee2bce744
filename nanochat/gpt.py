"""
The GPT model of the nanochat family, in one file.

What sets it apart from GPT-2 (all as in upstream nanochat):
- rotary position embeddings instead of learned positions
- QK-norm: queries and keys are RMS-normalized after the rotation
- untied token embedding and lm_head
- parameter-free RMSNorm, also right after the token embedding
- relu^2 MLP, no biases anywhere
- grouped-query attention (n_kv_head <= n_head), mostly useful for a smaller KV cache
- tanh soft-capped logits, computed in float32

Parameters are always float32. Mixed precision is the caller's business: it wraps the forward
pass in torch.autocast (and picks the SDPA backend) according to nanochat.precision; nothing
in this file looks at the hardware or the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import MuonAdamW


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA); n_head must be a multiple of it
    n_embd: int = 768
    softcap: float = 15.0  # logits become softcap * tanh(logits / softcap)

    @classmethod
    def from_depth(
        cls, depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64, head_dim: int = 128
    ) -> GPTConfig:
        """Derive the whole model from its depth, the one knob (as in upstream nanochat).

        width = depth * aspect_ratio, rounded up to a multiple of head_dim so every head is full;
        e.g. depth 12 -> 768 wide with 6 heads, depth 20 -> 1280 wide with 10 heads.
        """
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
        )


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without a learnable gain: one less thing to tune, and it works as well here
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D). Channel i of the first half is paired with channel i of the second half
    # and each pair is rotated by its own angle. The tables are float32; under autocast x may be
    # bf16/fp16, so the tables follow x (otherwise the product would be promoted to float32).
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionCache(Protocol):
    """What the forward asks of a KV cache (`pos`: tokens cached before this forward; `positions`:
    rotary positions of the new tokens, None if every row starts at 0; `attend`: store a layer's new
    keys/values, attend to all cached). Implemented by nanochat.infer.cache.KVCache (prompts, eager
    steps) and nanochat.infer.graphs.StaticStep (a decode step captured in a CUDA graph)."""

    pos: int

    def positions(self, num_tokens: int, rows: int | None = None) -> torch.Tensor | None: ...

    def attention_mask(self, num_tokens: int, device: torch.device, rows: int | None = None) -> tuple[torch.Tensor | None, bool]: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor: ...

    def advance(self, num_tokens: int) -> None: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, KV, S, D); mask (B, 1, T, S) bool, True = visible."""
    if k.size(1) != q.size(1):
        # Share each key/value head among H // KV query heads. An explicit repeat rather than
        # SDPA's enable_gqa flag: that flag needs torch >= 2.5 and is not taken by every backend
        # (the memory-efficient one used on P100, for instance).
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if q.size(2) == 1 and mask is not None:
        # One query per row, over a masked cache (a graphed decode step, a continuous batch): SDPA's
        # fused kernels share out work by blocks of queries, so a single query runs one thread block
        # per head over the whole cache; two matmuls and a softmax keep the GPU busy instead (about
        # 2x faster). The scores are rounded to the compute dtype by the matmul, as q and k are.
        scores = (q @ k.mT).float() * q.size(-1) ** -0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return weights.to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_qkv: nn.Linear | None = None  # c_q, c_k, c_v in one, after fuse_qkv()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache | None = None, layer: int = 0,
        mask: torch.Tensor | None = None, causal: bool = True,
    ) -> torch.Tensor:
        B, T, C = x.size()
        # (B, T, C) -> (B, heads, T, head_dim), the layout scaled_dot_product_attention expects
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded, which helps in fp16
        y = attention(q, k, v, mask, causal) if cache is None else cache.attend(layer, q, k, v, mask, causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.c_qkv is None:
            return self.c_q(x), self.c_k(x), self.c_v(x)
        kv_width = self.n_kv_head * self.head_dim
        return self.c_qkv(x).split([self.n_head * self.head_dim, kv_width, kv_width], dim=-1)

    def fuse_qkv(self) -> None:
        """Replace c_q, c_k and c_v by one matrix: one matmul instead of three per decoded token,
        where each matmul is a few microseconds of launch-bound work. For inference copies only:
        Muon orthogonalizes the three matrices separately, so training keeps them apart."""
        w = self.c_q.weight
        self.c_qkv = nn.Linear(w.size(1), w.size(0) + 2 * self.c_k.weight.size(0), bias=False, device=w.device, dtype=w.dtype)
        self.load_qkv(self.c_q, self.c_k, self.c_v)
        del self.c_q, self.c_k, self.c_v

    @torch.no_grad()
    def load_qkv(self, c_q: nn.Linear, c_k: nn.Linear, c_v: nn.Linear) -> None:
        """Copy separate q/k/v weights (e.g. of the model being trained) into the fused matrix."""
        self.c_qkv.weight.copy_(torch.cat([c_q.weight, c_k.weight, c_v.weight]))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu^2, as in upstream nanochat


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache | None = None, layer: int = 0,
        mask: torch.Tensor | None = None, causal: bool = True,
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, cache, layer, mask, causal)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Build the modules; the parameter values are only meaningful after init_weights()."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The rotary tables are tiny, so they cover 10x the training length: evaluation and
        # generation may run a little past it without growing anything. Not persistent:
        # they are recomputed, never loaded from a checkpoint.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (T, head_dim / 2)
        # (1, 1, T, head_dim / 2): broadcasts over batch and heads
        return freqs.cos()[None, None], freqs.sin()[None, None]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter, as upstream nanochat does.

        Deterministic given torch.manual_seed: modules are visited in a fixed order.
        - wte: normal, std 1 (the RMSNorm right after it makes the scale irrelevant downstream)
        - lm_head: normal, std 0.001, so the initial logits are near zero (loss ~ ln(vocab))
        - c_q, c_k, c_v, c_fc: uniform with std 1/sqrt(n_embd) (bound sqrt(3) times that);
          uniform rather than normal to avoid outliers
        - attn.c_proj, mlp.c_proj: zero, so every block starts as the identity. They still
          train: their gradients are non-zero from the first step, and Muon guards its
          normalization for the (then zero) gradients of the layers feeding them.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -bound, bound)
            nn.init.uniform_(block.attn.c_k.weight, -bound, bound)
            nn.init.uniform_(block.attn.c_v.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -bound, bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # Recomputed so that a model built on the meta device and then moved with to_empty()
        # gets real tables too.
        self.cos, self.sin = self._rotary_tables()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        kv_cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids with T <= 10 * sequence_len.

        With a kv_cache (inference), idx holds the tokens after the kv_cache.pos cached ones: their
        keys/values are appended to the cache and they attend to everything before them.

        Without targets: float32 soft-capped logits of shape (B, T, vocab_size).
        With targets (B, T): float32 cross-entropy; positions whose target is -1 are ignored.
        loss_reduction is passed to F.cross_entropy: 'mean' gives a scalar (NaN if every target
        is -1), 'sum' a scalar, 'none' a (B, T) tensor with 0 at ignored positions.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        assert start + T <= self.cos.size(2), f"position {start + T} exceeds the rotary tables ({self.cos.size(2)})"
        positions = kv_cache.positions(T, B) if kv_cache is not None else None
        if positions is None:
            cos, sin = self.cos[:, :, start : start + T], self.sin[:, :, start : start + T]
        else:  # each row at its own positions: (B, 1, T, head_dim / 2)
            cos, sin = self.cos[0, 0][positions][:, None], self.sin[0, 0][positions][:, None]

        mask, causal = kv_cache.attention_mask(T, idx.device, B) if kv_cache is not None else (None, True)
        x = norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, kv_cache, i, mask, causal)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)

        # Logits, softcap and loss in float32 whatever the autocast dtype: the softcap's tanh and
        # the log-softmax over a large vocabulary are where fp16/bf16 would lose the most.
        logits = self.lm_head(x).float()
        c = self.config.softcap
        logits = c * torch.tanh(logits / c)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(B, T) if loss_reduction == "none" else loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matrix_params(self) -> int:
        """Weights of the nn.Linear layers (lm_head included): what a matmul reads, unlike the
        embedding, which is a lookup."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward), with upstream nanochat's formula.

        Every weight of a matmul costs 2 FLOPs forward and 4 backward, hence 6 per parameter of
        each nn.Linear (lm_head included; the embedding is a lookup and costs nothing). Attention
        adds 12 * n_layer * n_head * head_dim * sequence_len for QK^T and AV over the full
        causal context (PaLM's accounting, which ignores the causal mask's halving).
        """
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * self.num_matrix_params() + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizer(
        self,
        matrix_lr: float = 0.02,
        embedding_lr: float = 0.2,
        unembedding_lr: float = 0.004,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.float32,
    ) -> MuonAdamW:
        """One MuonAdamW for the whole model: AdamW for wte and lm_head, Muon for block matrices.

        The AdamW learning rates were tuned at width 768 and are scaled by (n_embd / 768) ** -0.5
        for other widths, as in upstream nanochat. weight_decay (decoupled) applies to every group.
        Muon matrices are grouped by shape so Newton-Schulz runs once per shape on a stack.
        Every group records "initial_lr" for the caller's learning-rate schedule.
        """
        lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        groups = [
            dict(params=list(self.lm_head.parameters()), lr=unembedding_lr * lr_scale, **adamw),
            dict(params=list(self.transformer.wte.parameters()), lr=embedding_lr * lr_scale, **adamw),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(
                dict(
                    kind="muon",
                    params=[p for p in matrices if tuple(p.shape) == shape],
                    lr=matrix_lr,
                    momentum=0.95,
                    nesterov=True,
                    ns_steps=5,
                    ns_dtype=ns_dtype,
                    weight_decay=weight_decay,
                )
            )
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one group"
        return MuonAdamW(groups)  # records each group's "initial_lr"
