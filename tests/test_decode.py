"""The graph-ready decode step (static KV cache, device-side position) against the plain KV-cache
forward: on the CPU through the "static" mode (the computation the graph captures), on a GPU
through captured and replayed CUDA graphs, with and without torch.compile."""

import pytest
import torch

from nanochat.decode import Decoder
from nanochat.engine import Engine
from nanochat.gpt import KVCache
from nanochat.precision import resolve
from tests.test_engine import random_model

PLAN = resolve("float32", "cpu")


class _Tokens:
    """Special ids above the sampled range, so random weights never stop or start a tool call."""

    bos_token_id = 120

    def encode_special(self, name: str) -> int:
        return 121

    def decode(self, ids: list[int]) -> str:
        return ""

    def encode(self, text: str) -> list[int]:
        return []


def engine(model, plan, mode: str, **kwargs) -> Engine:
    e = Engine(model, _Tokens(), plan, decode=mode, **kwargs)
    e.stop_ids = set()
    return e


def run_generate(e: Engine, prompt: list[int]) -> list[list[int]]:
    return [tokens for tokens, _ in e.generate(prompt, num_samples=3, max_tokens=12, temperature=0.0)]


def run_batch(e: Engine, prompts: list[list[int]]) -> list[list[int | None]]:
    """Requests of different lengths that join and leave the batch at different steps."""
    return list(e.generate_many(prompts, [10, 14, 6], [0.0] * 3, [None] * 3, [0, 1, 2]))


PROMPTS = [[5, 9, 11, 3, 7, 2, 8], [4, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_static_step_decodes_like_the_plain_cache():
    model = random_model(128, n_kv_head=1)  # GQA too
    assert run_generate(engine(model, PLAN, "static"), PROMPTS[0]) == run_generate(engine(model, PLAN, "eager"), PROMPTS[0])
    assert run_batch(engine(model, PLAN, "static"), PROMPTS) == run_batch(engine(model, PLAN, "eager"), PROMPTS)


def test_workspace_is_reused_while_the_shape_fits():
    model = random_model(128)
    decoder = Decoder(model, PLAN, "static")
    prefill = KVCache(2, 20)
    model(torch.tensor([[1, 2, 3]]), kv_cache=prefill)
    a = decoder.workspace(4, 300, prefill)
    b = decoder.workspace(4, 500, prefill)
    assert a.max_len == b.max_len == 512 and a.k.data_ptr() == b.k.data_ptr()  # 256-column buckets
    assert decoder.workspace(8, 300, prefill).k.data_ptr() != a.k.data_ptr()


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="one of"):
        Decoder(random_model(128), PLAN, "fast")
    with pytest.raises(ValueError, match="CUDA"):
        Decoder(random_model(128), PLAN, "graph")


@pytest.mark.gpu
def test_cuda_graphs_decode_exactly_like_eager_in_fp32():
    plan = resolve("float32", "cuda")
    model = random_model(128).cuda()
    eager, graphed = engine(model, plan, "eager"), engine(model, plan, "graph")
    graphed.decoder.compile = False  # the same kernels, replayed: the tokens must be identical
    for _ in range(2):  # the first pass captures the graphs, the second replays them
        assert run_generate(graphed, PROMPTS[0]) == run_generate(eager, PROMPTS[0])
        assert run_batch(graphed, PROMPTS) == run_batch(eager, PROMPTS)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_follow_the_eager_logits_in_the_plans_dtype(compile):
    plan = resolve("auto", "cuda")
    model = random_model(128).cuda()
    prompt = torch.tensor([PROMPTS[0]], device="cuda")
    logits = {}
    for mode in ("eager", "graph"):
        e = engine(model, plan, mode)
        e.decoder.compile = compile and plan.compile
        cache = KVCache(2, 32)
        e._forward(prompt, cache)
        # clone: the graphed step returns a view of its static output buffer, valid until the next step
        logits[mode] = [e._forward(torch.tensor([[t]], device="cuda"), cache).float().clone() for t in (3, 5, 7, 9)]
    for a, b in zip(logits["graph"], logits["eager"], strict=True):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
