"""Evaluate a chat model (after mid-training or SFT) on multiple-choice and generative tasks.

    python -m nanochat.scripts.chat_eval --checkpoint ~/.cache/nanochat/runs/sft_d12
    # tiny, on a CPU laptop
    python -m nanochat.scripts.chat_eval --checkpoint runs/demo --device cpu --tasks arc_easy,spelling --max-problems 20
    # on a Ray cluster (one GPU)
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python -m nanochat.scripts.chat_eval --checkpoint /shared/runs/sft_d12

Categorical tasks (ARC, MMLU) are scored from logits: a batch of prompts goes through one forward
pass and, at each prompt's last position, the letter with the highest logit among the
conversation's letters is the answer, so the model need not produce a well-formed reply.
Generative tasks (GSM8K, HumanEval, spelling) sample an answer with the KV-cache engine (the
calculator tool included) and let the task grade it; with --num-samples k a problem counts as
solved when any of the k samples is right (pass@k).

ChatCORE is the mean over the evaluated tasks of the centered accuracy
(accuracy - chance) / (1 - chance): 0 is guessing, 1 is perfect, as in upstream nanochat.
Writes chat_eval.json (see `main`) into the checkpoint's run directory unless --out says otherwise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nanochat.chat import Conversation, render_for_completion
from nanochat.checkpoint import CheckpointError, load_for_inference, run_dir_of
from nanochat.common import init_process, save_result
from nanochat.config import CommonConfig, option, parse_config
from nanochat.distributed import sum_counts, world
from nanochat.errors import run_main
from nanochat.eval.offline import MissingDataError
from nanochat.infer.engine import SAMPLING, Engine, context_length
from nanochat.precision import PrecisionPlan
from nanochat.runlog import progress_bar
from nanochat.tasks import Task, load_task
from nanochat.tokenizer import Tokenizer

ALL_TASKS = "arc_easy,arc_challenge,mmlu,gsm8k,humaneval,spelling"

# An answer function gets a batch of conversations and returns one response per conversation:
# the answer text, a list of sampled answers (the problem is solved if any is right), or None when
# the prompt does not fit the model's context (scored wrong and counted as "too_long").
Response = str | list[str] | None
AnswerFn = Callable[[list[Conversation]], list[Response]]


@dataclass
class ChatEvalConfig(CommonConfig):
    checkpoint: str = option("", "a step_* directory, or a run dir / checkpoint root (its latest complete checkpoint)")
    tasks: str = option(ALL_TASKS, "comma-separated task names (see nanochat.tasks)")
    max_problems: int = option(0, "evaluate N problems of each task (a fixed, seeded sample: MMLU's first N would be one subject); 0 = all")
    batch_size: int = option(8, "prompts per forward pass for categorical tasks (memory grows with it)")
    num_samples: int = option(1, "answers sampled per generative problem; solved if any is right (pass@k)")
    max_new_tokens: int = option(256, "tokens per generated answer")
    temperature: float = option(0.0, "sampling temperature for generative tasks; 0 = greedy (scores that repeat)")
    top_k: int = option(SAMPLING.top_k, "sample among the k most likely tokens; 0 = all")
    tokenizer_dir: str = option("", "trained tokenizer; empty = the one the checkpoint recorded, else $NANOCHAT_BASE_DIR/tokenizer")
    out: str = option("", "output JSON file; empty = <run dir of the checkpoint>/chat_eval.json")


# -----------------------------------------------------------------------------
# scoring


def _solved(task: Task, conversation: Conversation, response: Response) -> bool:
    if response is None:
        return False
    responses = [response] if isinstance(response, str) else response
    return any(task.evaluate(conversation, r) for r in responses)


def evaluate_task(task: Task, answer_fn: AnswerFn, max_problems: int | None = None, batch_size: int = 1,
                  progress: bool = True) -> dict:
    """Accuracy of `answer_fn` on `max_problems` conversations of `task` (all if None or 0), a sample
    that is the same for every checkpoint (seed 0), in the task's order. Collective under a process
    group: rank r answers problems r, r+W, ... of the sample, every rank returns the counts of all.

    Returns {"accuracy", "n", "correct", "too_long", "eval_type", "random_baseline"}."""
    n = len(task) if not max_problems else min(max_problems, len(task))
    if n == 0:
        raise ValueError(f"task {task.name!r} has no problems to evaluate")
    indices = sorted(random.Random(0).sample(range(len(task)), n)) if n < len(task) else list(range(n))
    rank, world_size = world()
    mine = indices[rank::world_size]
    correct = too_long = 0
    bar = progress_bar(total=len(mine), desc=task.name, dynamic_ncols=True, disable=not progress or rank != 0)
    for start in range(0, len(mine), batch_size):
        batch = [task[i] for i in mine[start : start + batch_size]]
        responses = answer_fn(batch)
        if len(responses) != len(batch):
            raise ValueError(f"the answer function returned {len(responses)} responses for {len(batch)} conversations")
        for conversation, response in zip(batch, responses, strict=True):
            correct += _solved(task, conversation, response)
            too_long += response is None
        bar.update(len(batch))
        bar.set_postfix(accuracy=f"{correct / (start + len(batch)):.3f}", refresh=False)
    bar.close()
    correct, too_long = sum_counts([correct, too_long])
    return {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "too_long": too_long,
        "eval_type": task.eval_type,
        "random_baseline": task.random_baseline,
    }


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 at perfect; below 0 when worse than guessing."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def chatcore(results: dict[str, dict]) -> float:
    """Mean centered accuracy over the tasks in `results` (name -> evaluate_task's dict)."""
    return sum(centered_accuracy(r["accuracy"], r["random_baseline"]) for r in results.values()) / len(results)


# -----------------------------------------------------------------------------
# answer functions built from a model


def letter_token_ids(tokenizer: Tokenizer, letters: list[str]) -> list[int]:
    """The token id of each answer letter; categorical scoring needs every letter to be one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(
                f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; scoring multiple choice "
                "from logits needs one token per letter (a byte-level tokenizer always has one for A-J)"
            )
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def last_position_logits(model: nn.Module, plan: PrecisionPlan, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, vocab) logits after the last token of each prompt, from one forward pass over the batch.

    Prompts are right-padded: attention is causal, so the padding after a prompt cannot change
    the logits at its positions."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    batch = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt)] = torch.tensor(prompt)
    with plan.compute_context():
        logits = model(batch.to(device))
    return logits[torch.arange(len(prompts), device=device), lengths - 1]


def categorical_answers(model: nn.Module, tokenizer: Tokenizer, plan: PrecisionPlan) -> AnswerFn:
    """Answer each multiple-choice conversation with the letter whose token has the highest logit."""
    limit = context_length(model)

    def answer(conversations: list[Conversation]) -> list[Response]:
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        fits = [i for i, p in enumerate(prompts) if len(p) <= limit]
        responses: list[Response] = [None] * len(conversations)
        if not fits:
            return responses
        logits = last_position_logits(model, plan, [prompts[i] for i in fits], tokenizer.bos_token_id)
        for row, i in enumerate(fits):
            letters = conversations[i]["letters"]
            ids = torch.tensor(letter_token_ids(tokenizer, letters), device=logits.device)
            responses[i] = letters[int(logits[row, ids].argmax())]
        return responses

    return answer


def generative_answers(engine: Engine, num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_k: int | None = SAMPLING.top_k, seed: int = SAMPLING.seed) -> AnswerFn:
    """Sample `num_samples` answers per conversation with the engine (tool calls in their special-token text)."""
    tokenizer = engine.tokenizer
    limit = context_length(engine.model)

    def answer(conversations: list[Conversation]) -> list[Response]:
        responses: list[Response] = []
        for conversation in conversations:
            prompt = render_for_completion(tokenizer, conversation)
            if len(prompt) >= limit:
                responses.append(None)
                continue
            texts = engine.answers(prompt, num_samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   seed=seed)
            responses.append(texts[0] if num_samples == 1 else texts)
        return responses

    return answer


# -----------------------------------------------------------------------------
# main


def print_table(results: dict[str, dict], score: float) -> None:
    print(f"\n{'task':<16}{'type':<13}{'n':>6}{'accuracy':>10}{'chance':>9}{'centered':>10}")
    for name, r in results.items():
        centered = centered_accuracy(r["accuracy"], r["random_baseline"])
        print(f"{name:<16}{r['eval_type']:<13}{r['n']:>6}{r['accuracy']:>10.2%}{r['random_baseline']:>9.2%}{centered:>10.4f}")
    print(f"{'ChatCORE':<35}{score:>35.4f}")
    for name, r in results.items():
        if r["too_long"]:
            print(f"note: {r['too_long']} {name} prompts did not fit the model's context and were scored wrong")


def main(argv: list[str] | None = None) -> dict:
    """Evaluate and write {"stage": "chat_eval", "checkpoint", "tasks": {name: {"accuracy", "n", "correct",
    "too_long", "eval_type", "random_baseline"}}, "chatcore", "wall_time_s", "plan"}; returns it."""
    cfg = parse_config(ChatEvalConfig, argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise SystemExit("chat_eval: pass --checkpoint (a step_* directory or a run directory)")
    names = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    if not names:
        raise SystemExit("chat_eval: --tasks names no task")
    started = time.perf_counter()

    # ---- tasks first: a missing data set or a typo should fail before the model loads
    tasks: dict[str, Task] = {}
    for name in names:
        try:
            tasks[name] = load_task(name)
        except MissingDataError as e:
            raise SystemExit(f"chat_eval: task {name}: {e}") from e
        except KeyError as e:
            raise SystemExit(f"chat_eval: {e.args[0]}") from e

    # ---- init: device, precision, model, tokenizer
    device, plan = init_process(cfg)
    try:
        model, tokenizer, step_dir, _ = load_for_inference(cfg.checkpoint, device, cfg.tokenizer_dir)
    except CheckpointError as e:
        raise SystemExit(f"chat_eval: {e}") from None
    print(f"precision plan:\n{plan.summary()}\ncheckpoint: {step_dir}")

    # ---- answer functions
    by_type = {
        "categorical": categorical_answers(model, tokenizer, plan),
        "generative": generative_answers(Engine(model, tokenizer, plan), cfg.num_samples, cfg.max_new_tokens,
                                         cfg.temperature, cfg.top_k or None, cfg.seed),
    }

    # ---- evaluate
    results: dict[str, dict] = {}
    with torch.no_grad():
        for name, task in tasks.items():
            batch_size = cfg.batch_size if task.eval_type == "categorical" else 1
            try:
                results[name] = evaluate_task(task, by_type[task.eval_type], cfg.max_problems, batch_size)
            except MissingDataError as e:  # a task that reads its data lazily
                raise SystemExit(f"chat_eval: task {name}: {e}") from e

    # ---- report
    score = chatcore(results)
    print_table(results, score)
    result = {
        "stage": "chat_eval",
        "checkpoint": str(step_dir),
        "tasks": results,
        "chatcore": score,
        "wall_time_s": time.perf_counter() - started,
        "plan": plan.to_dict(),
    }
    save_result(result, cfg.out, run_dir_of(step_dir) / "chat_eval.json")
    return result


if __name__ == "__main__":
    run_main(main)
