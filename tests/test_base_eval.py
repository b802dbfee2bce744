"""CORE-style evaluation: task loaders, the accuracy bookkeeping, the GPT scorer against a plain
forward pass and against greedy generation, and base_eval end to end on a tiny trained checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from nanochat import precision
from nanochat.eval.core import (
    FEWSHOT_SEPARATOR,
    NOT_REPRODUCED,
    TASKS,
    Example,
    ModelScorer,
    Task,
    continuation_start,
    evaluate_core,
    evaluate_task,
    example_format,
    load_task,
)
from nanochat.eval.offline import MissingDataError
from nanochat.gpt import GPT, GPTConfig
from nanochat.infer.engine import generate
from nanochat.scripts import base_eval, base_train

CPU_PLAN = precision.plan_for(precision.DeviceInfo("cpu", "CPU"), "float32")  # whatever $NANOCHAT_DTYPE says


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these models are tiny: extra intra-op threads only add synchronization, which on a busy
    # 2-core machine made the file several times slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    try:
        return {name: load_task(name) for name in TASKS}
    except MissingDataError as e:
        pytest.skip(f"evaluation data not installed: {e}")


def tiny_gpt(vocab_size: int, sequence_len: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    # lm_head starts at std 0.001 (all options near-equal); widen it so option losses differ clearly
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def continuation_loss(model: GPT, tokenizer, context: str, continuation: str) -> float:
    """Mean loss of `continuation` after BOS + `context`, by the model's own loss (a second route)."""
    ctx = tokenizer.encode(context, prepend=tokenizer.bos_token_id)
    cont = tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    targets = torch.full_like(ids, -1)
    targets[0, len(ctx) - 1 : -1] = torch.tensor(cont)
    with torch.no_grad():
        return model(ids, targets).item()


# ---------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", list(TASKS))
def test_loader_gives_wellformed_examples(tasks, name):
    task = tasks[name]
    assert task.name == name and len(task.examples) >= 100
    fmt = {"winogrande": "schema", "basic_arithmetic": "language_modeling"}.get(name, "multiple_choice")
    assert task.format == fmt
    for ex in task.examples[:5]:
        assert example_format(ex) == fmt
        assert 0 <= ex.gold < ex.num_options
        assert all(isinstance(c, str) and c for pair in ex.options() for c in pair)
    if name == "hellaswag":  # most WikiHow rows carried "[header]"-style markers; none is left
        texts = [text for ex in task.examples for pair in ex.options() for text in pair]
        assert not any(m in t for t in texts for m in ("[header]", "[title]", "[step]", "[substeps]"))
    expected_baseline = {"language_modeling": 0.0, "schema": 0.5}.get(fmt)
    if expected_baseline is not None:
        assert task.random_baseline == expected_baseline
    elif name == "boolq":  # the majority answer's rate, as in CORE
        yes = sum(ex.gold for ex in task.examples) / len(task.examples)
        assert task.random_baseline == max(yes, 1 - yes) and 0.6 < task.random_baseline < 0.65
    else:
        assert 0.2 <= task.random_baseline <= 0.5


def test_known_rows_render_as_expected(tasks):
    # rows looked up by hand in the data files
    arith = tasks["basic_arithmetic"].examples[0]
    assert arith.options() == [("Calculate 5 + 91 =", " 96")]
    wino = tasks["winogrande"].examples[0]
    assert wino.options() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ] and wino.gold == 1
    copa = tasks["copa"].examples[0]
    assert copa.contexts == ["The man turned on the faucet therefore"] and copa.gold == 1
    assert copa.continuations[1] == " water flowed from the spout."
    arc = tasks["arc_easy"].examples[0]
    assert arc.contexts == ["Question: Which technology was developed most recently?\nAnswer:"]
    assert arc.continuations[arc.gold] == " cellular telephone"


# ---------------------------------------------------------------------------- bookkeeping


def test_oracle_is_perfect_and_sees_proper_shots(tasks):
    def oracle(example, shots):
        assert all(shot is not example for shot in shots), "an example must not be its own demonstration"
        assert len(shots) == tasks_by_example[id(example)].num_fewshot
        return example.gold

    tasks_by_example = {id(ex): t for t in tasks.values() for ex in t.examples}
    result = evaluate_core(list(tasks.values()), oracle, max_examples=10, progress=False)
    assert result["core"] == 1.0
    for name, r in result["tasks"].items():
        assert (r["accuracy"], r["centered"], r["n"]) == (1.0, 1.0, 10), name


def test_constant_guess_scores_chance_on_a_balanced_task():
    examples = [Example(["Q"], [" a", " b", " c", " d"], gold=i % 4) for i in range(40)]
    task = Task("balanced", "multiple_choice", examples, num_fewshot=2)
    assert task.random_baseline == 0.25
    r = evaluate_task(task, lambda example, shots: 0, progress=False)
    assert r["accuracy"] == 0.25 and abs(r["centered"]) < 1e-12 and r["n"] == 40
    # a subset and its shots are reproducible given the seed
    seen = []
    evaluate_task(task, lambda ex, shots: seen.append((id(ex), [id(s) for s in shots])) or 0, max_examples=5, seed=3, progress=False)
    again = []
    evaluate_task(task, lambda ex, shots: again.append((id(ex), [id(s) for s in shots])) or 0, max_examples=5, seed=3, progress=False)
    assert seen == again and len(seen) == 5


def test_malformed_tasks_are_refused():
    with pytest.raises(ValueError, match="gold"):
        Task("t", "multiple_choice", [Example(["Q"], [" a", " b"], gold=2)])
    with pytest.raises(ValueError, match="not schema"):
        Task("t", "schema", [Example(["Q"], [" a", " b"], gold=0)])


# ---------------------------------------------------------------------------- the GPT scorer


def test_continuation_start_handles_merges_across_the_boundary(tokenizer):
    for context, continuation in [("Question: why?\nAnswer:", " because"), ("The beginn", "ing of it"), ("He sa", "id")]:
        ctx = tokenizer.encode(context)
        full = tokenizer.encode(context + continuation)
        start = continuation_start(ctx, full)
        assert 0 < start < len(full)
        assert context.startswith(tokenizer.decode(full[:start]))
        assert tokenizer.decode(full[start:]).endswith(continuation)
    # the merge case really occurs with this vocabulary, so the branch is exercised
    ctx, full = tokenizer.encode("He sa"), tokenizer.encode("He said")
    assert full[: len(ctx)] != ctx and continuation_start(ctx, full) < len(ctx)


def test_scorer_picks_argmin_of_plain_forward_losses(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size)
    scorer = ModelScorer(model, tokenizer, CPU_PLAN, "cpu")
    mc = Example(["And God said, Let there be"], [" light", " a firmament in the midst of the waters", " darkness"], gold=0)
    scores = scorer.score(mc)
    plain = [continuation_loss(model, tokenizer, c, k) for c, k in mc.options()]
    assert scores.mean_losses == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert scorer(mc) == min(range(3), key=plain.__getitem__)

    schema = Example(["The king of Israel", "The king of Egypt"], [" went up to the house of the LORD."], gold=1)
    plain = [continuation_loss(model, tokenizer, c, k) for c, k in schema.options()]
    assert scorer.score(schema).mean_losses == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert scorer(schema) == min(range(2), key=plain.__getitem__)

    # with a shot, each option's context is the rendered demonstration followed by its own context
    shot = Example(["In the beginning"], [" God created"], gold=0)
    prefix = "In the beginning God created" + FEWSHOT_SEPARATOR
    plain = [continuation_loss(model, tokenizer, prefix + c, k) for c, k in mc.options()]
    scores = scorer.score(mc, [shot])
    assert scores.num_shots == 1 and scores.mean_losses == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_long_prompts_lose_shots_then_old_tokens(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size, sequence_len=32)
    scorer = ModelScorer(model, tokenizer, CPU_PLAN, "cpu")
    long_shot = Example(["And it came to pass " * 10], [" that"], gold=0)
    ex = Example(["He said to them,"], [" Go", " Come"], gold=0)
    rows, k = scorer.encode_options(ex, [long_shot])
    assert k == 0 and all(len(ids) <= 32 for ids, _ in rows)
    assert scorer.score(ex, [long_shot]).mean_losses == pytest.approx(scorer.score(ex).mean_losses)
    long_ex = Example(["Then the LORD said unto Moses, " * 10], [" Go", " Come"], gold=0)
    rows, _ = scorer.encode_options(long_ex, [])
    for (ids, start), (_, continuation) in zip(rows, long_ex.options(), strict=True):
        assert len(ids) == 32 and ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids[start:]) == continuation
    assert len(scorer.score(long_ex).mean_losses) == 2


def test_language_modeling_agrees_with_greedy_generation(tokenizer):
    """A model taught one sentence reproduces its continuation; the scorer and generate() agree."""
    model = tiny_gpt(tokenizer.vocab_size, seed=1).train()
    context, continuation = "Calculate 5 + 91 =", " 96"
    ids = torch.tensor([tokenizer.encode(context + continuation, prepend=tokenizer.bos_token_id)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    scorer = ModelScorer(model, tokenizer, CPU_PLAN, "cpu")
    for cont in (continuation, " 97"):
        ex = Example([context], [cont], gold=0)
        cont_ids = tokenizer.encode(cont)
        prompt = tokenizer.encode(context, prepend=tokenizer.bos_token_id)
        generated = list(generate(model, CPU_PLAN, prompt, len(cont_ids), temperature=0.0))
        reproduced = generated == cont_ids
        assert scorer(ex) == (0 if reproduced else NOT_REPRODUCED)
        assert reproduced == (cont == continuation)


# ---------------------------------------------------------------------------- end to end


def test_base_eval_end_to_end(data_dir, tokenizer_dir, tmp_path, tasks):
    run = tmp_path / "run"
    base_train.main([
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run),
        "--depth", "1", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "256", "--eval-tokens", "256", "--sample-every", "-1", "--eval-every", "-1",
        "--num-iterations", "4",
    ])
    names = ["arc_easy", "winogrande", "basic_arithmetic"]
    result = base_eval.main([
        "--checkpoint", str(run), "--device", "cpu", "--tokenizer-dir", str(tokenizer_dir),
        "--max-per-task", "4", "--tasks", ",".join(names),
    ])
    saved = json.loads((run / "base_eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["stage"] == "base_eval" and saved["checkpoint"].endswith("step_000004")
    assert list(saved["tasks"]) == names and saved["plan"]["dtype"] == "float32"
    for name, r in saved["tasks"].items():
        assert r["n"] == 4 and 0 <= r["accuracy"] <= 1 and r["format"] == tasks[name].format
        assert r["num_fewshot"] == tasks[name].num_fewshot
        assert r["centered"] == pytest.approx((r["accuracy"] - tasks[name].random_baseline) / (1 - tasks[name].random_baseline))
    assert saved["core"] == pytest.approx(sum(r["centered"] for r in saved["tasks"].values()) / 3)
    assert saved["wall_time_s"] > 0


def test_missing_data_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path))
    with pytest.raises(MissingDataError, match="not found"):
        load_task("arc_easy")
    with pytest.raises(SystemExit, match="data set split"):
        base_eval.main(["--checkpoint", str(tmp_path), "--tasks", "winogrande", "--device", "cpu"])


def test_missing_checkpoint_is_reported(tmp_path, tasks):
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        base_eval.main(["--checkpoint", str(tmp_path), "--tasks", "copa", "--device", "cpu"])
