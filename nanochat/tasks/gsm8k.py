"""GSM8K: grade-school math word problems (test split, 1319 problems), answered with calculator calls.

GSM8K's worked answers mark each computation as "<<48/2=24>>"; the reference answer turns every
mark into a tool call (python "48/2", python_output "24", the output being what our calculator
returns, as at inference) and keeps the final "#### 72". A response is right when the number after
its "####" (else its last number) equals the gold answer.
"""

from __future__ import annotations

import re

from nanochat.calculator import calculate
from nanochat.chat import Conversation
from nanochat.eval.offline import read_task_requests
from nanochat.tasks.base import NumericAnswerTask, exchange

_MARK = re.compile(r"<<([^<>]*)>>")


def tool_parts(answer: str) -> list[dict]:
    """A GSM8K worked answer as assistant parts, each "<<expr=result>>" becoming a calculator call."""
    parts: list[dict] = []
    position = 0
    for mark in _MARK.finditer(answer):
        if mark.start() > position:
            parts.append({"type": "text", "text": answer[position : mark.start()]})
        expression, _, written = mark.group(1).partition("=")
        result = calculate(expression)
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": written if result is None else result})
        position = mark.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


class GSM8K(NumericAnswerTask):
    name = "gsm8k"

    def __init__(self, split: str = "test"):
        if split != "test":
            raise ValueError("only GSM8K's test split ships with the evaluation data (split='test')")
        self.docs = read_task_requests("gsm8k/gold_bpb_5shot")

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, i: int) -> Conversation:
        doc = self.docs[i]
        return exchange(doc["question"], tool_parts(doc["answer"]), answer=doc["short_answer"].replace(",", ""))
