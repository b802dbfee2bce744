"""The few-row Triton matmul of decode steps against torch's matmul.

Run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined, so in
a fresh interpreter process) and, where there is a GPU, compiled for it, in a CUDA graph and (on
compute capability 9.0+) with programmatic dependent launch."""

import importlib.util

import pytest

from tests.conftest import run_fresh

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CHECK = """
import torch
import torch.nn.functional as F
from nanochat.infer.matvec_kernel import FewRowLinear, decode_linear, matvec, programmatic_launch, supports

device = "{device}"
g = torch.Generator().manual_seed(0)
rand = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(device, dtype)

# the kernel: rows held apart by a stride, outputs not a multiple of a program's block, K not a power
# of two, and a K long enough to take fewer output features per program
for rows, n, k in [(1, 37, 80), (2, 100, 3000), (2, 9, 16)]:
    w, x = rand(n, k), rand(rows, k + 5)[:, :k]
    torch.testing.assert_close(matvec(x, w, pdl=False), x @ w.t(), atol=1e-4, rtol=1e-4)

# the custom op as torch.compile sees it (fake tensors, schema)
torch.library.opcheck(decode_linear, (rand(2, 1, 40, dtype=torch.bfloat16), rand(30, 40, dtype=torch.bfloat16)))

# FewRowLinear: the kernel where supports() says so, nn.Linear's matmul elsewhere
two = 2 if programmatic_launch(torch.device(device)) else 1  # rows the kernel takes
assert supports(1, 1280, torch.bfloat16, torch.device(device)) and supports(two, 5120, torch.float16, torch.device(device))
assert not supports(two + 1, 1280, torch.bfloat16, torch.device(device))
assert not supports(1, 1280, torch.float32, torch.device(device))
assert not supports(1, 20000, torch.bfloat16, torch.device(device))  # a weight row too long for one program
linear = torch.nn.Linear(48, 20, bias=False, device=device).to(torch.bfloat16)
linear.__class__ = FewRowLinear
for rows in (1, 2, 4):
    x = rand(rows, 1, 48)  # float32, as the residual stream is: cast to the weights' dtype
    expected = F.linear(x.to(torch.bfloat16), linear.weight).float()
    with torch.autocast(device, torch.bfloat16):  # as the decode step runs (nn.Linear's path needs it)
        out = linear(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1, 20)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)

if device == "cuda":  # 16-bit weights, in a CUDA graph, with programmatic dependent launch where there is one
    for dtype in (torch.bfloat16, torch.float16):
        w1, w2, x = rand(3072, 768, dtype=dtype) / 28, rand(768, 3072, dtype=dtype) / 55, rand(1, 768, dtype=dtype)
        pdl = programmatic_launch(x.device)
        chain = lambda: matvec(matvec(x, w1, pdl), w2, pdl)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = chain()
        graph.replay()
        expected = (x.float() @ w1.float().t()).to(dtype).float() @ w2.float().t()
        torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)
print("ok")
"""


def run_check(device: str, env: dict) -> None:
    run_fresh(CHECK.replace("{device}", device), env)


def test_matvec_matches_torch_in_the_interpreter():
    run_check("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_matvec_matches_torch_on_the_gpu():
    run_check("cuda", {})


@pytest.mark.gpu
def test_bench_matvec_times_every_way(tmp_path):
    from nanochat.scripts import bench_matvec

    out = bench_matvec.main(["--depth", "2", "--vocab-size", "512", "--rows", "1,2", "--repeats", "3",
                             "--out", str(tmp_path / "m.json")])
    ways = {(r["rows"], r["way"]) for r in out["results"]}
    assert {(1, "cublas"), (1, "triton"), (2, "cublas"), (2, "triton")} <= ways
    assert all(r["us_per_chain"] > 0 and r["max_rel_error"] < 2e-2 for r in out["results"])
    assert (tmp_path / "m.json").exists()


@pytest.mark.gpu
def test_bench_matvec_refuses_a_float32_plan():
    from nanochat.scripts import bench_matvec

    with pytest.raises(SystemExit, match="16-bit weights"):
        bench_matvec.main(["--dtype", "float32", "--depth", "2"])
