"""The one-kernel sampler (nanochat/infer/sample_kernel.py) against the tensor ops of
nanochat/infer/sampling.py, token for token: ties, flat rows, signed zeros, top-k of 1, of the whole
vocabulary and beyond it, tiny temperatures, greedy rows, any int64 seed, rows held apart by a stride,
16-bit logits, and vocabularies of one block and of several.

Run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, in a fresh process) and, where there is a
GPU, compiled for it. On the GPU the two may differ where two candidates' perturbed logits are an ulp
apart (Triton's and torch's logarithms round differently): each difference must be such a near-tie."""

import importlib.util

import pytest

from tests.conftest import run_fresh

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CHECK = """
import torch
from nanochat.infer.sample_kernel import sample_rows
from nanochat.infer.sampling import _gumbel, sample

device = "{device}"
g = torch.Generator().manual_seed(0)
differ = checked = 0
for vocab in (64, 1000, 100_000):  # 100,000: more than one block per row
    rows = 24
    wide = 3 * torch.randn(rows, vocab + 8, generator=g)
    logits = wide[:, :vocab]  # rows a stride apart
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie at the top
    logits[1] = 0.0  # a flat row
    logits[2, : vocab // 2] = -0.0
    logits[3, :3] = 1e4  # top-3 far ahead of the rest
    temperature = torch.tensor([0.8, 1.0, 1.0, 0.0, 1e-6, 2.0] * 4)
    top_k = torch.tensor([50, 0, 3, 5, 1, vocab, vocab + 7, 2] * 3)
    seed = torch.tensor([7, -3, 2**62 + 5, 0, 1, -(2**63)] * 4)
    index = torch.arange(rows) * 3
    args = [t.to(device) for t in (temperature, top_k, seed, index)]
    for x in (logits, logits.to(torch.bfloat16)):
        got = sample_rows(x.to(device), *args).cpu()
        want = sample(x.float().to(device), *args, max_top_k=int(top_k.max())).cpu()
        for r in (got != want).nonzero().flatten().tolist():
            assert device == "cuda", ("the interpreter must agree exactly", vocab, r)
            noise = _gumbel(seed[r : r + 1], index[r : r + 1], vocab)[0]
            perturbed = (x[r].float() - x[r].float().max()) / temperature[r] + noise
            a, b = perturbed[got[r]].item(), perturbed[want[r]].item()
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (vocab, r, a, b)
            differ += 1
        checked += rows
assert differ <= checked // 20, (differ, checked)
print("ok")
"""


def test_the_kernel_draws_as_the_tensor_ops_in_the_interpreter():
    run_fresh(CHECK.replace("{device}", "cpu"), {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_the_kernel_draws_as_the_tensor_ops_on_the_gpu():
    run_fresh(CHECK.replace("{device}", "cuda"), {})


def test_bench_sampler_refuses_a_cpu_and_bad_sizes_before_anything_runs():
    from nanochat.scripts import bench_sampler

    with pytest.raises(SystemExit, match="vocabulary sizes"):
        bench_sampler.main(["--vocab-sizes", "lots"])
    with pytest.raises(SystemExit, match="run it on a GPU"):
        bench_sampler.main(["--device", "cpu"])


@pytest.mark.gpu
def test_bench_sampler_times_both_ways(tmp_path):
    from nanochat.scripts import bench_sampler

    out = bench_sampler.main(["--vocab-sizes", "1000,20000", "--rows", "1,4", "--repeats", "5", "--out", str(tmp_path / "s.json")])
    assert {(r["vocab"], r["rows"], r["way"]) for r in out["results"]} == {
        (v, n, way) for v in (1000, 20000) for n in (1, 4) for way in ("tensor ops", "triton kernel")}
    assert all(r["us_per_call"] > 0 for r in out["results"])
    assert all(r["rows_drawn_otherwise"] <= 1 for r in out["results"] if r["way"] == "triton kernel")
    assert (tmp_path / "s.json").exists()
