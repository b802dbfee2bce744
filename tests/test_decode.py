"""The graph-ready decode step (static KV cache, device-side position) against the plain KV-cache
forward: on the CPU through the "static" mode (the computation the graph captures), on a GPU
through captured and replayed CUDA graphs, with and without torch.compile; the continuous batch's
warm-up (every graph before the first request) and chunked prefill (running rows never stall)."""

import pytest
import torch

from nanochat.infer.batch import DecodeBatch, Request, decode_many
from nanochat.infer.cache import KVCache
from nanochat.infer.engine import Engine
from nanochat.infer.graphs import Decoder
from nanochat.infer.sampling import BatchSampler
from nanochat.precision import resolve
from tests.test_batching import alone
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
    return list(decode_many(e, prompts, [10, 14, 6], [0.0] * 3, [None] * 3, [0, 1, 2]))


PROMPTS = [[5, 9, 11, 3, 7, 2, 8], [4, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_static_step_decodes_like_the_plain_cache():
    model = random_model(128, n_kv_head=1)  # GQA too
    assert run_generate(engine(model, PLAN, "static"), PROMPTS[0]) == run_generate(engine(model, PLAN, "eager"), PROMPTS[0])
    assert run_batch(engine(model, PLAN, "static"), PROMPTS) == run_batch(engine(model, PLAN, "eager"), PROMPTS)


def test_a_group_prefilled_in_its_padded_shape_matches_the_plain_prefill(monkeypatch):
    model = random_model(128, n_kv_head=1, sequence_len=256)
    static, eager = engine(model, PLAN, "static"), engine(model, PLAN, "eager")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # 3 rows -> 4, 10 columns -> 16
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    plain = KVCache(2, width, pad=pad.clone())
    expected = eager.prefill(ids, plain)
    cache, logits = static.decoder.prefill(ids, pad)
    assert static.decoder.prefill_shape(3, width) == (4, 16) and cache.pos == width
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for row, prompt in enumerate(prompts):  # the real columns' keys and values, padding left out
        real = slice(width - len(prompt), width)
        torch.testing.assert_close(cache.k[:, row, :, real], plain.k[:, row, :, real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.v[:, row, :, real], plain.v[:, row, :, real], rtol=1e-4, atol=1e-4)
    assert static.decoder.prefill_shape(1, 129) is None and static.decoder.prefill_shape(64, 32) is None
    assert eager.decoder.prefill(ids, pad) is None  # eager decoding prefills as it always did
    # the batch prefills a group that fits through it, never through the plain forward
    monkeypatch.setattr(static, "prefill", lambda *args: pytest.fail("a group that fits was prefilled eagerly"))
    assert run_batch(static, PROMPTS) == run_batch(eager, PROMPTS)


def test_sync_weights_brings_a_trained_model_into_the_decode_copy():
    model = random_model(128, n_kv_head=1)
    static, eager = engine(model, PLAN, "static"), engine(model, PLAN, "eager")
    run_generate(static, PROMPTS[0])  # builds the decode copy (q/k/v fused) from the weights as they are
    with torch.no_grad():
        for p in model.parameters():  # as an RL step would
            p.add_(0.05 * torch.randn_like(p))
    assert run_generate(static, PROMPTS[0]) == run_generate(eager, PROMPTS[0])


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
    graphed.decoder.compile = False  # fp32 all through: the tokens must be identical
    for _ in range(2):  # the first pass captures the graphs, the second replays them
        assert run_generate(graphed, PROMPTS[0]) == run_generate(eager, PROMPTS[0])
        assert run_batch(graphed, PROMPTS) == run_batch(eager, PROMPTS)


def decode_logits(model, plan, mode: str, device: str, compile: bool = False) -> torch.Tensor:
    e = engine(model, plan, mode)
    e.decoder.compile = compile and plan.compile
    cache = KVCache(2, 32)
    e.prefill(torch.tensor([PROMPTS[0]], device=device), cache)
    # clone: the graphed step returns a view of its static output buffer, valid until the next step
    return torch.stack([e.decoder(torch.tensor([[t]], device=device), cache).float().clone() for t in (3, 5, 7, 9)])


def assert_as_accurate_as_eager(plan, mode: str, device: str, compile: bool = False) -> None:
    """In 16 bits the decode step (fused q/k/v, its own single-query attention) rounds differently
    from the eager forward, so both are held against float32: the decode step may not be much
    further from it than the eager forward is."""
    model = random_model(128).to(device)
    reference = decode_logits(model, resolve("float32", device), "eager", device)
    eager_error = (decode_logits(model, plan, "eager", device) - reference).abs()
    error = (decode_logits(model, plan, mode, device, compile) - reference).abs()
    assert error.mean() <= 1.5 * eager_error.mean(), (error.mean(), eager_error.mean())
    assert error.max() <= 3 * eager_error.max(), (error.max(), eager_error.max())


def test_static_step_in_bf16_is_as_accurate_as_eager():
    assert_as_accurate_as_eager(resolve("bfloat16", "cpu"), "static", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_in_the_plans_dtype_are_as_accurate_as_eager(compile):
    assert_as_accurate_as_eager(resolve("auto", "cuda"), "graph", "cuda", compile)


@pytest.mark.gpu
def test_compiled_decode_steps_multiply_with_the_few_row_kernel():
    from nanochat.infer.matvec_kernel import FewRowLinear

    e = engine(random_model(128).cuda(), resolve("auto", "cuda"), "graph")
    linears = [m for m in e.decoder.weights.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, FewRowLinear) for m in linears) == e.decoder.compile


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_get_a_token_every_step(monkeypatch):
    e = engine(random_model(128, n_kv_head=1), PLAN, "eager")
    chunks = []
    prefill = e.prefill
    monkeypatch.setattr(e, "prefill", lambda ids, cache: (chunks.append(tuple(ids.shape)), prefill(ids, cache))[1])
    running = Request([5, 9, 11], 24, temperature=0.0)
    long = Request([(7 * i) % 100 + 1 for i in range(40)], 8, temperature=1.0, top_k=20, seed=3)
    batch = DecodeBatch(e, slots=2, capacity=64, prefill_tokens=8)
    runner = batch.add(running)
    tokens = {runner: list(batch.step().values())}
    joiner = batch.add(long)
    tokens[joiner] = []
    chunks.clear()
    while batch.busy:
        out = batch.step()
        assert runner in out or runner not in batch.active()  # the running row never waits a step
        for rid, token in out.items():
            tokens[rid].append(token)
    assert chunks[:5] == [(1, 8)] * 5  # 40 prompt tokens, 8 a step
    assert tokens[joiner] == alone(e, long) and tokens[runner] == alone(e, running)


def test_warm_up_decodes_nothing_where_there_is_nothing_to_capture(monkeypatch):
    e = engine(random_model(128), PLAN, "static")
    batch = DecodeBatch(e, slots=4, capacity=32)
    monkeypatch.setattr(e, "prefill", lambda *args: pytest.fail("warm-up prefilled a prompt"))
    monkeypatch.setattr(Decoder, "__call__", lambda *args: pytest.fail("warm-up decoded a step"))
    batch.warm_up()


@pytest.mark.gpu
def test_warm_up_captures_every_row_count_so_none_is_captured_while_serving(monkeypatch):
    plan = resolve("float32", "cuda")
    e = engine(random_model(128).cuda(), plan, "graph")
    e.decoder.compile = False
    batch = DecodeBatch(e, slots=5, capacity=64)
    batch.warm_up()
    assert set(e.decoder._graphs) == {1, 2, 4, 5}  # row counts rounded up to powers of two, up to the slots
    monkeypatch.setattr(Decoder, "_capture", lambda *args: pytest.fail("a graph was captured while serving"))
    requests = [Request(p, n, temperature=0.8, top_k=20, seed=i) for i, (p, n) in enumerate(zip(PROMPTS * 2, [9, 4, 6, 3, 8, 5], strict=True))]
    for request in requests:
        batch.add(request)
        batch.step()
    while batch.busy:
        batch.step()


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["triton kernel", "captured tensor ops"])
def test_a_served_step_waits_for_the_device_only_to_read_its_tokens(monkeypatch, sampler):
    """Requests join, leave, are cancelled, sample with and without top-k (in the one-kernel sampler,
    or in the P100 plan's captured tensor ops) and the cache is compacted, with every synchronizing CUDA
    call an error: a step may wait only for its tokens' copy (an event, which sync debug mode does not
    count), so the step launched ahead runs while the host works."""
    shifts = []
    original = KVCache.shift
    monkeypatch.setattr(KVCache, "shift", lambda self, delta, start=0: (shifts.append(delta), original(self, delta, start)))
    e = engine(random_model(128).cuda(), resolve("float32", "cuda"), "graph")
    e.decoder.compile = False
    batch = DecodeBatch(e, slots=4, capacity=26)  # the longest prompt + max_tokens: compacted while serving
    if sampler == "triton kernel":  # as where the plan compiles (the kernel needs no compiled step)
        batch.sampler = BatchSampler(4, batch.device, fused=True)
    batch.warm_up()
    settings = [(0.8, 20), (0.0, None), (1.0, 5)]
    requests = [Request(p, n, *settings[i % 3], seed=i) for i, (p, n) in enumerate(zip(PROMPTS * 3, [9, 4, 16, 3, 14, 5, 12, 7, 2], strict=True))]
    got: dict[int, int] = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(400):
            if step % 4 == 0 and requests:
                rid = batch.add(requests.pop())
                if len(requests) == 4:
                    cancelled = rid
            if step == 18:
                batch.cancel(cancelled)
            for rid in batch.step():
                got[rid] = got.get(rid, 0) + 1
            if not requests and not batch.busy:
                break
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not batch.busy and any(d < 0 for d in shifts)  # all answered; the cache was compacted
    assert len(got) == 8 + (cancelled in got) and got.get(cancelled, 0) < 14


@pytest.mark.gpu
def test_captured_sampling_draws_what_eager_sampling_draws(monkeypatch):
    """Without the sampling kernel (the P100 plan), a decode step's sampling replays a graph per row count
    and top-k width, all captured by the warm-up: every request gets exactly the tokens that sampling
    without graphs gives it (whatever its batch mates' widths), and the same alone."""
    plan = resolve("float32", "cuda")
    model = random_model(128).cuda()
    settings = [(0.8, 20, 1), (1.0, None, 2), (0.0, None, 3), (0.7, 50, 4), (2.0, 1, 5), (0.9, 90, 6)]
    requests = [Request(p, n, temperature=t, top_k=k, seed=seed)
                for p, n, (t, k, seed) in zip(PROMPTS * 2, [9, 4, 6, 3, 8, 5], settings, strict=True)]

    def run(graphs: bool) -> tuple[list[list[int]], int]:
        e = engine(model, plan, "graph")
        e.decoder.compile = False
        batch = DecodeBatch(e, slots=4, capacity=64)
        assert batch.sampler.graphs
        batch.sampler.graphs = graphs
        batch.warm_up()
        warmed = set(batch.sampler._graphs)
        assert not graphs or warmed == {(ptr, rows, width) for ptr, rows, _ in warmed for width in (0, 2, 4, 8, 16, 32, 64, 128)}
        assert not graphs or {rows for _, rows, _ in warmed} == {1, 2, 4}  # the decoder's step row counts
        eager_steps = []
        draw = batch.sampler._draw
        monkeypatch.setattr(batch.sampler, "_draw", lambda logits, rows, k: (eager_steps.append(isinstance(rows, slice)), draw(logits, rows, k))[1])
        tokens: dict[int, list[int]] = {}
        for request in requests:  # one joins every step, so rows join and leave while others sample
            tokens[batch.add(request)] = []
            for rid, token in batch.step().items():
                tokens[rid].append(token)
        while batch.busy:
            for rid, token in batch.step().items():
                tokens[rid].append(token)
        assert set(batch.sampler._graphs) == warmed  # nothing captured while decoding
        return [tokens[rid] for rid in sorted(tokens)], sum(eager_steps)

    graphed, eager_steps = run(True)
    assert eager_steps == 0  # every decode step's sampling replayed a graph (joins sample eagerly)
    assert graphed == run(False)[0]
    lone = engine(model, plan, "graph")
    lone.decoder.compile = False
    assert graphed[0] == alone(lone, requests[0])
