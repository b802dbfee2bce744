"""chat_eval: scoring with in-test answer functions, the batched multiple-choice path against
per-prompt forwards, and the whole script on a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import find_latest
from nanochat.eval.offline import MissingDataError
from nanochat.gpt import GPT, GPTConfig
from nanochat.infer.engine import context_length
from nanochat.precision import resolve
from nanochat.scripts import base_train, chat_eval
from nanochat.tasks import Task, load_task
from nanochat.tasks.base import reference_response

PLAN = resolve("float32", "cpu")
LETTERS = ["A", "B", "C", "D"]


class LetterTask(Task):
    """Multiple choice with every gold letter equally often; questions of growing length."""

    name, eval_type, random_baseline = "letters", "categorical", 0.25

    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> dict:
        question = "Which one? " + "and then some more words " * (i % 5)
        choices = "\n".join(f"{letter}. choice {letter.lower()}{i}" for letter in LETTERS)
        gold = LETTERS[i % 4]
        return {"messages": [{"role": "user", "content": f"{question}\n{choices}"}, {"role": "assistant", "content": gold}],
                "letters": LETTERS, "answer": gold}

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response.strip() == conversation["answer"]


class EchoTask(Task):
    """Generative: repeat the number in the question."""

    name, eval_type, random_baseline = "echo", "generative", 0.0

    def __len__(self) -> int:
        return 6

    def get(self, i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response == conversation["messages"][-1]["content"]


def oracle(conversations: list[dict]) -> list[str]:
    return [reference_response(c) for c in conversations]


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("batch_size", [1, 5])
def test_oracle_scores_everything_and_a_constant_scores_chance(batch_size):
    task = LetterTask(12)
    perfect = chat_eval.evaluate_task(task, oracle, batch_size=batch_size, progress=False)
    constant = chat_eval.evaluate_task(task, lambda convs: ["C"] * len(convs), batch_size=batch_size, progress=False)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == 12
    assert constant["accuracy"] == 0.25 == task.random_baseline
    results = {"perfect": perfect, "constant": constant}
    assert chat_eval.chatcore(results) == pytest.approx(0.5)  # centered: 1 and 0


def test_generative_scoring_max_problems_pass_at_k_and_prompts_that_do_not_fit():
    task = EchoTask()
    assert chat_eval.evaluate_task(task, oracle, max_problems=4, progress=False) == {
        "accuracy": 1.0, "n": 4, "correct": 4, "too_long": 0, "eval_type": "generative", "random_baseline": 0.0}
    # pass@k: a problem counts when any of its samples is right
    some_right = chat_eval.evaluate_task(task, lambda convs: [["nope", *oracle(convs)] for _ in convs], progress=False)
    assert some_right["accuracy"] == 1.0
    # None = the prompt did not fit the model's context: wrong, and counted
    skipped = chat_eval.evaluate_task(task, lambda convs: [None] * len(convs), progress=False)
    assert skipped["accuracy"] == 0.0 and skipped["too_long"] == 6


@pytest.mark.parametrize("name", ["arc_easy", "mmlu", "gsm8k", "spelling", "humaneval"])
def test_reference_answers_score_full_marks_on_the_real_tasks(name):
    try:
        task = load_task(name)
    except MissingDataError as e:
        pytest.skip(str(e))
    result = chat_eval.evaluate_task(task, oracle, max_problems=3, batch_size=2, progress=False)
    assert result["accuracy"] == 1.0 and result["n"] == 3
    assert result["eval_type"] == task.eval_type


# ----------------------------------------------------------------------------- the logits path


def random_gpt(vocab_size: int, sequence_len: int = 64) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # all weights random, so the letters' logits differ clearly
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_batched_letter_choice_equals_per_prompt_forwards(tokenizer):
    model = random_gpt(tokenizer.vocab_size, sequence_len=640)  # a context that holds every prompt
    conversations = [LetterTask(10)[i] for i in range(10)]
    prompts = [chat_eval.render_for_completion(tokenizer, c) for c in conversations]
    assert len({len(p) for p in prompts}) > 1, "the batch must need padding"
    letter_ids = chat_eval.letter_token_ids(tokenizer, LETTERS)

    batched = chat_eval.last_position_logits(model, PLAN, prompts, tokenizer.bos_token_id)
    with torch.no_grad():
        single = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)

    expected = [LETTERS[int(row[letter_ids].argmax())] for row in single]
    assert chat_eval.categorical_answers(model, tokenizer, PLAN)(conversations) == expected
    assert len(set(expected)) > 1, "a model that always picks one letter would make this test vacuous"


def test_prompts_past_the_context_are_not_answered(tokenizer):
    conversations = [LetterTask(5)[i] for i in (0, 4)]
    lengths = [len(chat_eval.render_for_completion(tokenizer, c)) for c in conversations]
    model = random_gpt(tokenizer.vocab_size, sequence_len=lengths[0])  # the context it was trained on
    assert lengths[0] <= context_length(model) < lengths[1]
    answers = chat_eval.categorical_answers(model, tokenizer, PLAN)(conversations)
    assert answers[0] in LETTERS and answers[1] is None


def test_letters_must_be_single_tokens(tokenizer):
    with pytest.raises(ValueError, match="one token per letter"):
        chat_eval.letter_token_ids(tokenizer, ["A", "Alternatively"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir, tokenizer_dir) -> Path:
    """A run directory with a few-step depth-1 base checkpoint (shared with test_chat_cli.py: the
    directory is fixed under the session's base temp dir, so it is trained once per session)."""
    run = tmp_path_factory.getbasetemp() / "chat_tiny_run"
    if find_latest(run / "checkpoints") is None:
        base_train.main([
            "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run),
            "--depth", "1", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
            "--total-batch-size", "256", "--num-iterations", "4", "--eval-tokens", "256", "--eval-every", "-1",
            "--sample-every", "-1", "--save-every", "-1", "--compile", "off",
        ])
    return run


def test_chat_eval_writes_its_json_next_to_the_checkpoint(tiny_run, tokenizer_dir):
    try:
        load_task("arc_easy")
    except MissingDataError as e:
        pytest.skip(str(e))
    result = chat_eval.main([
        "--checkpoint", str(tiny_run), "--device", "cpu", "--tokenizer-dir", str(tokenizer_dir),
        "--tasks", "arc_easy,spelling", "--max-problems", "4", "--batch-size", "3", "--max-new-tokens", "8",
    ])
    written = json.loads((tiny_run / "chat_eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["stage"] == "chat_eval" and written["checkpoint"] == str(find_latest(tiny_run / "checkpoints"))
    assert set(written["tasks"]) == {"arc_easy", "spelling"}
    for name, eval_type in (("arc_easy", "categorical"), ("spelling", "generative")):
        task = written["tasks"][name]
        assert task["n"] == 4 and task["eval_type"] == eval_type and 0.0 <= task["accuracy"] <= 1.0
    centered = [(t["accuracy"] - t["random_baseline"]) / (1 - t["random_baseline"]) for t in written["tasks"].values()]
    assert written["chatcore"] == pytest.approx(sum(centered) / 2)
    assert written["plan"]["device"] == "cpu" and written["wall_time_s"] > 0


def test_missing_data_set_exits_with_its_message(tiny_run, tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="arc_easy.*not a directory"):
        chat_eval.main(["--checkpoint", str(tiny_run), "--device", "cpu", "--tokenizer-dir", str(tokenizer_dir),
                        "--tasks", "arc_easy", "--out", str(tmp_path / "out.json")])
