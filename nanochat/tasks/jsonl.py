"""Conversations from a local jsonl file, one {"messages": [...]} object per line.

This is how your own chat data joins a training mixture: "jsonl=/path/to/file.jsonl[:count]" in a
mixture spec (see nanochat/tasks/__init__.py). Each line may carry extra keys; they are kept.
"""

from __future__ import annotations

import copy
from pathlib import Path

from nanochat.chat import Conversation, assistant_text
from nanochat.eval.offline import read_jsonl
from nanochat.tasks.base import Task


class JsonlTask(Task):
    """A file of conversations; `evaluate` compares a response with the reference answer's text."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"jsonl:{self.path.name}"
        self.rows = read_jsonl(self.path)
        for number, row in enumerate(self.rows, 1):
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"{self.path}: line {number} is not a conversation {{'messages': [{{...}}, ...]}}")

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> Conversation:
        return copy.deepcopy(self.rows[i])

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return response.strip() == assistant_text(conversation).strip()
