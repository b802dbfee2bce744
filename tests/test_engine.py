"""KV-cache decoding against the cache-free reference, batched sampling, the calculator tool."""

import pytest
import torch

from nanochat.calculator import calculate
from nanochat.gpt import GPT, GPTConfig
from nanochat.infer.batch import decode_many
from nanochat.infer.cache import KVCache
from nanochat.infer.engine import Engine, generate
from nanochat.precision import resolve

PLAN = resolve("float32", "cpu")


def random_model(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A tiny GPT with every weight random (init_weights zeroes the output projections, which
    would make attention irrelevant and the cache test vacuous)."""
    torch.manual_seed(seed)
    cfg = dict(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_cached_forward_matches_full_forward(kv_heads):
    model = random_model(128, n_kv_head=kv_heads)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = KVCache(2, 20)
    # a prefill of 8, a chunk of 5 (needs the offset causal mask), then single tokens
    parts = [model(ids[:, :8], kv_cache=cache), model(ids[:, 8:13], kv_cache=cache)]
    parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_engine_greedy_equals_reference_without_cache(tokenizer):
    model = random_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, PLAN)
    prompt = tokenizer.encode("In the beginning God", prepend=tokenizer.bos_token_id)
    expected = list(generate(model, PLAN, prompt, 12, temperature=0.0))
    stop = engine.stop_ids
    cut = next((i + 1 for i, t in enumerate(expected) if t in stop), len(expected))
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=0.0)
    for row, mask in zip(results, masks, strict=True):
        assert row == prompt + expected[:cut]
        assert mask == [0] * len(prompt) + [1] * cut


def test_sampling_is_seeded_and_rows_differ(tokenizer):
    engine = Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)
    prompt = tokenizer.encode("And", prepend=tokenizer.bos_token_id)
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=50, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=50, seed=7)
    assert a == b
    assert len({tuple(r) for r in a}) > 1


class ScriptedModel(torch.nn.Module):
    """Greedily 'writes' a fixed token script regardless of input: lets the test drive the tool loop."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0
        self.transformer = torch.nn.ModuleDict({"h": torch.nn.ModuleList([torch.nn.Identity()])})
        self.register_buffer("cos", torch.zeros(1, 1, 256, 1))
        self.config = GPTConfig(sequence_len=256)  # the engine's context rule reads it
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, kv_cache=None):
        logits = torch.zeros(idx.size(0), idx.size(1), self.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        kv_cache.advance(idx.size(1))
        return logits


def test_tool_output_is_forced_and_masked(tokenizer):
    sp = tokenizer.encode_special
    call = [sp("<|python_start|>"), *tokenizer.encode("12*7"), sp("<|python_end|>")]
    # after the call the scripted model keeps proposing the end token; the engine must first force the output
    script = call + [sp("<|assistant_end|>")] * 20
    engine = Engine(ScriptedModel(script, tokenizer.vocab_size), tokenizer, PLAN)
    results, masks = engine.generate_batch([tokenizer.bos_token_id], max_tokens=30, temperature=0.0)
    generated, mask = results[0][1:], masks[0][1:]
    output = [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")]
    assert generated == call + output + [sp("<|assistant_end|>")]
    assert mask == [1] * len(call) + [0] * len(output) + [1]


@pytest.mark.parametrize("expression, value", [
    ("12*7", "84"), ("1,234 + 6", "1240"), ("(3+4)**2 - 1", "48"), ("7/2", "3.5"), ("10/2", "5"),
    ("-3 % 5", "2"), ("17 // 5", "3"), ("'strawberry'.count('r')", "3"), ("2**-1", "0.5"),
])
def test_calculator_evaluates_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "x + 1", "[1, 2][0]",
    "(lambda: 1)()", "9**9**9", "10**100", "1/0", "True + 1", "'a' * 1000", "'ab'.upper()",
    "().__class__", "1 if 1 else 2", "1" * 300, "", "2 +",
])
def test_calculator_refuses_everything_else(expression):
    assert calculate(expression) is None


def test_prompts_of_different_lengths_decode_together_as_they_do_alone(tokenizer):
    model = random_model(tokenizer.vocab_size, n_kv_head=1)
    engine = Engine(model, tokenizer, PLAN)
    prompts = [tokenizer.encode(t, prepend=tokenizer.bos_token_id) for t in ("And God said", "In", "He went up to the mountain")]
    limits = [10, 4, 7]
    alone = []
    for prompt, limit in zip(prompts, limits, strict=True):
        rows, _ = engine.generate_batch(prompt, 1, max_tokens=limit, temperature=0.0)
        alone.append(rows[0][len(prompt):])
    together: list[list[int]] = [[] for _ in prompts]
    for step in decode_many(engine, prompts, limits, [0.0] * 3, [None] * 3, [0] * 3):
        for r, token in enumerate(step):
            if token is not None:
                together[r].append(token)
    assert together == alone


def test_batched_sampling_follows_each_rows_seed(tokenizer):
    engine = Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)
    prompt = tokenizer.encode("And", prepend=tokenizer.bos_token_id)

    def run(seeds):
        return [step for step in decode_many(engine, [prompt, prompt], [6, 6], [1.0, 1.0], [50, 50], seeds)]

    assert run([1, 1]) == run([1, 1])
    same = run([3, 3])
    assert all(a == b for a, b in same)  # same prompt and seed: same sample in both rows
