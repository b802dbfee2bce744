"""The paper scaling model of docs/scaling.md: its inputs come from the real model."""

from __future__ import annotations

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.scripts import scaling_model


def test_numbers_match_a_real_model_and_the_ring_formula():
    params, flops = scaling_model.model_numbers(2, vocab_size=512, seq_len=64)
    real = GPT(GPTConfig.from_depth(2, 512, 64))  # allocated on the CPU this time
    assert (params, flops) == (real.num_params(), real.estimate_flops())
    assert params == sum(p.numel() for p in real.parameters() if p.requires_grad)  # what AllReduceGradients sends
    # 2 GPUs: each sends half and receives half, twice (reduce-scatter + all-gather) = the buffer once
    assert scaling_model.allreduce_seconds(12e9, 2, 12.0) == pytest.approx(1.0)
    assert scaling_model.allreduce_seconds(1e9, 1, 1.0) == 0.0
    assert torch.device("meta")  # model_numbers builds on the meta device: nothing allocated


def test_tables_print():
    text = scaling_model.main(["--depths", "2"])
    assert "| 64 |" in text and "NVLink" in text
