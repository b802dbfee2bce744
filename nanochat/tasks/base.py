"""The task interface and the answer parsing the tasks share.

A task is a sequence of conversations whose last message is the reference assistant answer, plus
`evaluate(conversation, response)`: is a generated answer right? Two kinds:

  categorical  multiple choice; the user message lists "A. ...", "B. ..." and asks for the letter,
               the reference answer is the letter; the conversation also carries "letters" and
               "answer" (the gold letter) so an evaluator can score the letters' logits directly.
  generative   free text (tool calls allowed); evaluated by parsing the response.

The registry of task names and the training mixtures are in nanochat/tasks/__init__.py.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence

from nanochat.chat import Conversation

LETTERS = "ABCDEFGHIJ"


class Task:
    """A fixed-size, indexable set of conversations and the rule that grades an answer."""

    name: str = ""
    eval_type: str = "generative"  # or "categorical"
    random_baseline: float = 0.0

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> Conversation:
        """Conversation `i`, 0 <= i < len(self); subclasses build it here (a fresh dict each call)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> Conversation:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} conversations")
        return self.get(i % n)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self.get(i)

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        raise NotImplementedError

    def reward(self, conversation: Conversation, response: str) -> float:
        return float(self.evaluate(conversation, response))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {len(self)} conversations, {self.eval_type})"


def exchange(user: str, assistant: str | list[dict], **extra) -> Conversation:
    """A one-turn conversation: the user's message, the reference answer, then any extra keys."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


# -----------------------------------------------------------------------------
# multiple choice


def multiple_choice_conversation(question: str, choices: Sequence[str], gold: int, **extra) -> Conversation:
    """The categorical format: choices lettered A, B, C...; the reference answer is the gold letter."""
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= gold < len(choices):
        raise ValueError(f"bad multiple choice item: {len(choices)} choices, gold index {gold}")
    letters = list(LETTERS[: len(choices)])
    listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    user = f"{question.strip()}\n\n{listed}\n\nAnswer with the letter of the correct choice."
    return exchange(user, letters[gold], letters=letters, answer=letters[gold], **extra)


_LETTER_ANSWER = re.compile(r"^[\s(\[*\"']*(?i:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?[(\[*]*([A-J])(?![A-Za-z])")


def chosen_letter(response: str) -> str | None:
    """The letter a response opens with: "B", "B.", "(B) ...", "Answer: B" -> "B"; else None."""
    match = _LETTER_ANSWER.match(response)
    return match.group(1).upper() if match else None


class MultipleChoiceTask(Task):
    """A categorical task over a list of (question, choices, gold index, extra keys) items."""

    eval_type = "categorical"

    def __init__(self, items: list[tuple[str, list[str], int, dict]]):
        self.items = items
        self.random_baseline = sum(1 / len(choices) for _, choices, _, _ in items) / max(len(items), 1)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> Conversation:
        question, choices, gold, extra = self.items[i]
        return multiple_choice_conversation(question, choices, gold, **extra)

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        letter = chosen_letter(response)
        return letter is not None and letter in conversation["letters"] and letter == conversation["answer"]


# -----------------------------------------------------------------------------
# numeric answers ("#### 42")

_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _to_float(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def final_number(response: str) -> float | None:
    """The number after the last "####", else the last number in the text; commas and $ ignored."""
    if "####" in response:
        match = _NUMBER.search(response.rsplit("####", 1)[1])
        if match:
            return _to_float(match.group())
    numbers = _NUMBER.findall(response)
    return _to_float(numbers[-1]) if numbers else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def response_text(content: str | list[dict]) -> str:
    """An assistant message as the engine writes it: tool calls in their special-token text."""
    if isinstance(content, str):
        return content
    wrap = {
        "text": "{}",
        "python": "<|python_start|>{}<|python_end|>",
        "python_output": "<|output_start|>{}<|output_end|>",
    }
    return "".join(wrap[part["type"]].format(part["text"]) for part in content)


def reference_response(conversation: Conversation) -> str:
    """The reference (last) assistant answer of a conversation, as `response_text` writes it."""
    return response_text(conversation["messages"][-1]["content"])


class NumericAnswerTask(Task):
    """A generative task graded by the final number: conversation["answer"] holds the gold one."""

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return same_number(final_number(response), _to_float(str(conversation["answer"])))


# -----------------------------------------------------------------------------
# seeded synthetic tasks


def item_rng(*key: object) -> random.Random:
    """A generator seeded from a tuple of names and ints, the same in every process.

    (String seeds go through SHA-512 in `random.seed`, not through the per-process `hash`.)"""
    return random.Random("/".join(str(k) for k in key))


class SyntheticTask(Task):
    """Conversations generated from (split, seed, index): any index is reproducible on its own.

    train and test use different seed streams, so their items are drawn independently."""

    splits = ("train", "test")
    default_sizes = {"train": 10_000, "test": 500}

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0):
        if split not in self.splits:
            raise ValueError(f"{self.name}: split must be one of {self.splits}, got {split!r}")
        self.split, self.seed = split, seed
        self.size = self.default_sizes[split] if size is None else size
        if self.size < 0:
            raise ValueError(f"{self.name}: size must be >= 0, got {size}")

    def __len__(self) -> int:
        return self.size

    def get(self, i: int) -> Conversation:
        return self.generate(item_rng(self.name, self.split, self.seed, i))

    def generate(self, rng: random.Random) -> Conversation:
        raise NotImplementedError
