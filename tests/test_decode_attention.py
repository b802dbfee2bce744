"""The Triton decode-attention kernels against the plain cache write + attention they replace.

Run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined, so in
a fresh interpreter process) and, where there is a GPU, compiled for it."""

import importlib.util

import pytest

from tests.conftest import run_fresh

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CHECK = """
import torch
import nanochat.infer.attention_kernel as kernels
from nanochat.infer.attention_kernel import decode_attention
from nanochat.gpt import attention

def check(device, dtype, rows, heads, kv_heads, columns, pos, dim=32):
    g = torch.Generator().manual_seed(rows * 100 + columns)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    q, k, v = rand(rows, heads, 1, dim), rand(rows, kv_heads, 1, dim), rand(rows, kv_heads, 1, dim)
    caches = rand(2, rows + 1, kv_heads, columns, dim), rand(2, rows + 1, kv_heads, columns, dim)  # a spare row
    pad = torch.randint(0, pos + 1, (rows,), generator=g).to(device)
    pad[0] = 0
    # the reference: write column pos, attend to columns pad .. pos
    k_ref, v_ref = (c.clone() for c in caches)
    k_ref[1, :rows, :, pos], v_ref[1, :rows, :, pos] = k[:, :, 0], v[:, :, 0]
    cols = torch.arange(columns, device=device)
    mask = ((cols >= pad[:, None]) & (cols <= pos))[:, None, None, :]
    expected = attention(q.float(), k_ref[1, :rows].float(), v_ref[1, :rows].float(), mask, False)
    out = decode_attention(q, k, v, *caches, 1, torch.tensor([pos], device=device), pad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(caches[0], k_ref)  # the new key in place, nothing else touched
    torch.testing.assert_close(caches[1], v_ref)

device = "{device}"
for tensor_cores, dtype in [(t, d) for t in (True, False) for d in {dtypes}]:
    kernels.tensor_cores = lambda device: tensor_cores  # both products: tl.dot and multiply-and-sum
    check(device, dtype, rows=3, heads=4, kv_heads=2, columns=200, pos=150)  # GQA, 4 splits, padded rows
    check(device, dtype, rows=1, heads=2, kv_heads=2, columns=64, pos=0)  # only the new token to see
    check(device, dtype, rows=2, heads=2, kv_heads=1, columns=64 * 64 * 2 + 64, pos=8000, dim=16)  # splits of 3 blocks
print("ok")
"""


def run_check(device: str, dtypes: str, env: dict) -> None:
    run_fresh(CHECK.replace("{device}", device).replace("{dtypes}", dtypes), env)


def test_kernels_match_the_plain_attention_in_the_interpreter():
    run_check("cpu", "[torch.float32]", {"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
def test_kernels_match_the_plain_attention_on_the_gpu():
    run_check("cuda", "[torch.float32, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16]", {})
