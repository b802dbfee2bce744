"""HumanEval: 164 Python functions to complete from their signature and docstring.

The user message is the prompt (imports, signature, docstring); the reference answer is the whole
function (prompt + canonical solution). A response passes when prompt + its code + the task's
tests + check(entry_point) runs to its end in the isolated subprocess of nanochat/execution.py
(unprivileged user, no network, whole process tree killed): an answer that exits early, even with
status 0, fails. The prompt goes first so that a body-only answer completes it and a whole-function
answer redefines it.
"""

from __future__ import annotations

import re

from nanochat.chat import Conversation
from nanochat.eval.offline import read_task_requests
from nanochat.tasks.base import Task, exchange

_FENCED = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def extract_code(response: str) -> str:
    """The code of a response: the first ``` fenced block if there is one, else the whole text."""
    response = _SPECIAL.sub("", response)
    match = _FENCED.search(response)
    return match.group(1) if match else response


def program(doc: dict, response: str) -> str:
    """The script that tests a response: prompt, extracted code, tests, check(entry_point)."""
    return f"{doc['prompt']}{extract_code(response)}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


class HumanEval(Task):
    name = "humaneval"

    def __init__(self, timeout: float = 5.0):
        self.docs = read_task_requests("codex_humaneval/gold_bpb_0shot")
        self.by_id = {doc["task_id"]: doc for doc in self.docs}
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, i: int) -> Conversation:
        doc = self.docs[i]
        return exchange(doc["prompt"], doc["prompt"] + doc["canonical_solution"], task_id=doc["task_id"],
                        entry_point=doc["entry_point"])

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        from nanochat.execution import run_python  # executes code: only imported when grading

        doc = self.by_id[conversation["task_id"]]
        return bool(run_python(program(doc, response), timeout=self.timeout).passed)
