"""Chat tasks: every task renders, reference answers grade as right and wrong ones as wrong, the
calculator reproduces every tool output the references contain, synthetic items are reproducible,
mixtures count/shuffle/read files, and missing data says so."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from nanochat.calculator import calculate
from nanochat.chat import render_conversation, render_for_completion
from nanochat.eval.offline import EVAL_DATA_ENV, MissingDataError
from nanochat.tasks import EVAL_TASK_NAMES, TASK_NAMES, TRAIN_TASK_NAMES, load_mixture, load_task
from nanochat.tasks.base import Task, chosen_letter, final_number, reference_response
from nanochat.tasks.humaneval import extract_code

DATA_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "mmlu_aux")
SYNTHETIC_TASKS = ("spelling", "identity", "arithmetic")

_loaded: dict[str, Task] = {}


def task_named(name: str) -> Task:
    if name not in _loaded:
        _loaded[name] = load_task(name)
    return _loaded[name]


def sample_indices(task: Task, k: int = 12) -> list[int]:
    n = len(task)
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def tool_calls(conversation: dict) -> list[tuple[str, str]]:
    """(python expression, python_output) pairs of the reference answer."""
    parts = conversation["messages"][-1]["content"]
    if isinstance(parts, str):
        return []
    return [(a["text"], b["text"]) for a, b in zip(parts, parts[1:], strict=False) if a["type"] == "python" and b["type"] == "python_output"]


def test_registry_matches_contract():
    assert set(TASK_NAMES) == {
        "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling", "identity", "arithmetic", "mmlu_aux",
    }
    assert set(EVAL_TASK_NAMES) | set(TRAIN_TASK_NAMES) == set(TASK_NAMES)
    with pytest.raises(KeyError, match="unknown task"):
        load_task("no_such_task")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loads_and_renders(name, tokenizer):
    task = task_named(name)
    assert len(task) > 0 and task.name == name
    assert task.eval_type in ("categorical", "generative")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    for i in sample_indices(task, 5):
        conversation = task[i]
        assert conversation["messages"][-1]["role"] == "assistant"
        ids, mask = render_conversation(tokenizer, conversation)
        assert len(ids) == len(mask) and any(mask)
        prompt = render_for_completion(tokenizer, conversation)
        assert prompt[-1] == assistant_start and len(prompt) < len(ids)
        if task.eval_type == "categorical":
            letters = conversation["letters"]
            assert conversation["answer"] in letters and conversation["messages"][-1]["content"] == conversation["answer"]
            assert all(f"\n{letter}. " in conversation["messages"][0]["content"] for letter in letters)
    if task.eval_type == "categorical":
        assert 0.19 < task.random_baseline < 0.35
    else:
        assert task.random_baseline == 0.0
    assert task[-1] == task[len(task) - 1]
    with pytest.raises(IndexError):
        task[len(task)]


def wrong_response(task: Task, conversation: dict) -> str:
    if task.eval_type == "categorical":
        return next(letter for letter in conversation["letters"] if letter != conversation["answer"])
    if "answer" in conversation:
        return f"I think it is {float(conversation['answer']) + 1:g}.\n#### {float(conversation['answer']) + 1:g}"
    return "I'm not sure."


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n != "humaneval"])
def test_reference_answers_grade_right_and_wrong_answers_wrong(name):
    task = task_named(name)
    for i in sample_indices(task):
        conversation = task[i]
        assert task.evaluate(conversation, reference_response(conversation)), (name, i)
        assert task.reward(conversation, reference_response(conversation)) == 1.0
        assert not task.evaluate(conversation, wrong_response(task, conversation)), (name, i)
        assert task.reward(conversation, wrong_response(task, conversation)) == 0.0


def test_categorical_letter_parsing():
    assert chosen_letter("B") == "B" and chosen_letter(" B.") == "B" and chosen_letter("(C) because") == "C"
    assert chosen_letter("Answer: D") == "D" and chosen_letter("The answer is A") == "A" and chosen_letter("**B**") == "B"
    assert chosen_letter("Because plants") is None and chosen_letter("a lot") is None and chosen_letter("") is None
    task = task_named("arc_easy")
    conversation = task[0]
    assert task.evaluate(conversation, f"{conversation['answer']}. Sunlight")
    assert not task.evaluate(conversation, "Z")


def test_final_number_parsing():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == 1234
    assert final_number("#### $18.") == 18
    assert final_number("It costs -5 dollars") == -5
    assert final_number("16-3-4 leaves 9") == 9
    assert final_number("16-3-4") == 4  # a minus between numbers is not a sign
    assert final_number("<|output_start|>12<|output_end|> so 12.5 in all") == 12.5
    assert final_number("no numbers here") is None
    assert final_number("#### nothing, but 3 earlier") == 3


def test_gsm8k_reference_and_calculator_agree():
    task = task_named("gsm8k")
    assert len(task) == 1319
    for i in range(len(task)):
        conversation = task[i]
        assert final_number(reference_response(conversation)) == float(conversation["answer"])
        for expression, output in tool_calls(conversation):
            assert calculate(expression) == output  # the calculator is what the engine calls at inference
    # GSM8K's own "<<expr=result>>" annotations and our calculator agree (up to GSM8K's rounding)
    annotations = [m.partition("=") for doc in task.docs for m in re.findall(r"<<([^<>]*)>>", doc["answer"])]
    numeric = [(e, float(w)) for e, _, w in annotations if re.fullmatch(r"-?\d*\.?\d+", w)]
    assert len(numeric) > 4000
    assert all(math.isclose(float(calculate(e)), w, rel_tol=1e-2, abs_tol=1e-2) for e, w in numeric)
    first = task[0]
    assert tool_calls(first) == [("16-3-4", "9"), ("9*2", "18")]
    assert "<<" not in reference_response(first)


def test_humaneval_canonical_solutions_pass():
    pytest.importorskip("nanochat.execution")
    task = task_named("humaneval")
    assert len(task) == 164
    for i in (0, 2, 32, 163):
        conversation = task[i]
        doc = task.by_id[conversation["task_id"]]
        # three routes to the same program: body only, whole function, whole function in a fence
        assert task.evaluate(conversation, doc["canonical_solution"]), i
        assert task.evaluate(conversation, reference_response(conversation)), i
        assert task.evaluate(conversation, f"Here you go:\n```python\n{reference_response(conversation)}```\nDone."), i
        assert not task.evaluate(conversation, "    return None\n"), i
        assert not task.evaluate(conversation, "this is not code"), i


def test_extract_code():
    assert extract_code("```python\nx = 1\n```\nsome text") == "x = 1\n"
    assert extract_code("text\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("    return 3\n") == "    return 3\n"


def test_arithmetic_tool_calls_compute_the_reference():
    task = load_task("arithmetic", split="test", size=300)
    kinds = set()
    for conversation in task:
        calls = tool_calls(conversation)
        assert 1 <= len(calls) <= 3
        for expression, output in calls:
            assert calculate(expression) == output, expression
        answer = final_number(reference_response(conversation))
        assert answer == float(conversation["answer"]) == float(calls[-1][1]) and answer == int(answer)
        kinds.add(conversation["messages"][0]["content"].split()[1])
    assert len(kinds) > 20  # varied wording and names


def test_spelling_reference_counts_letters():
    task = load_task("spelling", split="test", size=200)
    zeros = 0
    for conversation in task:
        word, letter = conversation["word"], conversation["letter"]
        ((expression, output),) = tool_calls(conversation)
        assert expression == f"'{word}'.count('{letter}')"
        assert calculate(expression) == output == conversation["answer"] == str(word.count(letter))
        assert f"{'-'.join(word)}." in reference_response(conversation)
        zeros += output == "0"
    assert 0 < zeros < 100


def test_spelling_train_and_test_are_disjoint():
    train, test = load_task("spelling", split="train", size=2000), load_task("spelling", split="test", size=300)
    assert not {c["word"] for c in train} & {c["word"] for c in test}
    assert not set(train.words) & set(test.words)
    assert train[0] != test[0]


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_synthetic_items_are_reproducible(name):
    a, b = load_task(name, split="train", seed=3), load_task(name, split="train", seed=3)
    assert [a[i] for i in (7, 0, 123)] == [b[i] for i in (123, 0, 7)][::-1]  # any index, any order
    assert load_task(name, split="train", size=5)[4] == load_task(name, split="train", size=500)[4]
    other_seed = load_task(name, split="train", seed=4)
    other_split = load_task(name, split="test", seed=3)
    same_seed = sum(a[i] == other_seed[i] for i in range(50))
    same_split = sum(a[i] == other_split[i] for i in range(50))
    assert same_seed < 25 and same_split < 25  # identity has few distinct short conversations
    assert len({json.dumps(a[i], sort_keys=True) for i in range(200)}) > 60


def test_identity_conversations():
    task = load_task("identity", size=300)
    turns = Counter(len(c["messages"]) // 2 for c in task)
    assert set(turns) == {1, 2, 3}
    text = " ".join(m["content"] for c in task for m in c["messages"] if m["role"] == "assistant")
    for fact in ("nanochat-ray", "P100", "Ray", "SFT", "mistakes", "calculator"):
        assert fact in text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_mixture_counts_shuffles_and_reads_files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "mine": i}
            for i in range(3)]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    spec = f"identity:7, arithmetic:5,jsonl={path}:8,spelling:4"
    mixture = load_mixture(spec, seed=1)
    assert len(mixture) == 24
    kinds = Counter("jsonl" if "mine" in c else "identity" if "topic" in c else "spelling" if "word" in c else "arithmetic"
                    for c in mixture)
    assert kinds == {"identity": 7, "arithmetic": 5, "jsonl": 8, "spelling": 4}
    assert sorted(Counter(c["mine"] for c in mixture if "mine" in c).values()) == [2, 3, 3]  # cycled
    assert load_mixture(spec, seed=1) == mixture
    again = load_mixture(spec, seed=2)
    assert len(again) == 24 and [json.dumps(c) for c in again] != [json.dumps(c) for c in mixture]
    assert sorted(c["mine"] for c in load_mixture(f"jsonl={path}")) == [0, 1, 2]  # no count: the whole file
    small = load_mixture("mmlu_aux:10", seed=0)
    assert len(small) == 10 and len({c["messages"][0]["content"] for c in small}) == 10  # a subset, not a cycle
    # synthetic mixture items come from the train split
    train = load_task("arithmetic", split="train", size=5)
    assert sorted(map(json.dumps, load_mixture("arithmetic:5"))) == sorted(json.dumps(c) for c in train)


def test_load_mixture_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown task"):
        load_mixture("identity:3,nope:2")
    with pytest.raises(MissingDataError):
        load_mixture(f"jsonl={tmp_path / 'missing.jsonl'}")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "not a conversation"}])
    with pytest.raises(ValueError, match="line 1"):
        load_mixture(f"jsonl={bad}")


@pytest.mark.parametrize("name", DATA_TASKS)
def test_missing_data_raises(name, tmp_path, monkeypatch):
    monkeypatch.setenv(EVAL_DATA_ENV, str(tmp_path))
    with pytest.raises(MissingDataError):
        load_task(name)
    assert len(load_task("arithmetic", size=3)) == 3  # synthetic tasks need no data
