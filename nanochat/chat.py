"""The chat format: conversations -> token ids with a loss mask, and batches of them for training.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}` with roles alternating
user, assistant, user, ... (an optional leading "system" message is folded into the first user
message: the model has no system turn). An assistant's content is either a string or a list of
parts, `{"type": "text" | "python" | "python_output", "text": ...}`, where "python" is a
calculator call the assistant makes and "python_output" is what the tool answered.

Rendered, with the special tokens of nanochat.tokenizer:

    <|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> <|user_start|> ...
    inside an assistant turn:  text <|python_start|> 12*7 <|python_end|> <|output_start|> 84 <|output_end|> text

The mask is 1 on the tokens the model must learn to produce (assistant text, its tool calls and
<|assistant_end|>) and 0 elsewhere: user turns, <|assistant_start|> (the prompt already contains
it at inference) and tool outputs (they come from the tool, not from the model).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from nanochat.tokenizer import Tokenizer

Conversation = dict


class ConversationError(ValueError):
    """A conversation does not follow the chat format; the message says which part."""


def _turns(conversation: Conversation) -> list[dict]:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages:
        raise ConversationError("a conversation is {'messages': [...]} with at least one message")
    messages = list(messages)
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ConversationError("a system message must be followed by a user message")
        merged = f"{messages[0]['content']}\n\n{messages[1]['content']}"
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ConversationError(f"message {i} has role {message.get('role')!r}; expected {expected!r} (user and assistant alternate)")
    return messages


def _assistant_parts(content: str | list) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    for part in content:
        if part.get("type") not in ("text", "python", "python_output"):
            raise ConversationError(f"unknown assistant part type {part.get('type')!r}")
    return content


def render_conversation(tokenizer: Tokenizer, conversation: Conversation, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and the loss mask (1 = train on this token), same length."""
    special = tokenizer.encode_special
    ids, mask = [tokenizer.bos_token_id], [0]

    def add(tokens: Sequence[int], trained: int) -> None:
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    for message in _turns(conversation):
        if message["role"] == "user":
            add([special("<|user_start|>"), *tokenizer.encode(message["content"]), special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        for part in _assistant_parts(message["content"]):
            text = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([special("<|python_start|>"), *text, special("<|python_end|>")], 1)
            else:
                add([special("<|output_start|>"), *text, special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tokenizer: Tokenizer, conversation: Conversation) -> list[int]:
    """The prompt that asks the model for the next assistant turn: the conversation up to its last
    user message (a trailing assistant message, e.g. a reference answer, is dropped), then
    <|assistant_start|>."""
    messages = _turns(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, {"messages": messages})
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def assistant_text(conversation: Conversation) -> str:
    """The text of the last assistant message (tool calls and outputs left out)."""
    content = _turns(conversation)[-1]["content"]
    return "".join(p["text"] for p in _assistant_parts(content) if p["type"] == "text")


class ChatLoader:
    """(x, y) batches of rendered conversations for mid-training and SFT, targets -1 off the mask.

    pack=True (mid-training): conversations are concatenated into full rows of T+1 tokens, no
    padding; pack=False (SFT): one conversation per row, right-padded, as upstream nanochat's SFT
    does, so the model sees every conversation from its start.
    The order is a seeded permutation per epoch and data-parallel worker `rank` takes every
    `world`-th conversation of it. Every batch starts on a fresh conversation (the tail of one that
    did not fit is dropped), so the position {"epoch", "index"} resumes exactly.
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 device: torch.device | str = "cpu", pack: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 state: dict | None = None):
        if len(conversations) < world:
            raise ValueError(f"{len(conversations)} conversations cannot be split over {world} workers")
        self.conversations, self.tokenizer = conversations, tokenizer
        self.batch_size, self.seq_len, self.device, self.pack = batch_size, seq_len, torch.device(device), pack
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.index = (state["epoch"], state["index"]) if state else (0, 0)
        self._order_cache: list[int] = []
        self._order_epoch = -1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _order(self) -> list[int]:
        """This worker's conversation indices for the current epoch (computed once per epoch)."""
        if self._order_epoch != self.epoch:
            order = list(range(len(self.conversations)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order_cache, self._order_epoch = order[self.rank :: self.world], self.epoch
        return self._order_cache

    def _next_rendered(self) -> tuple[list[int], list[int]]:
        order = self._order()
        if self.index >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order = self._order()
        conversation = self.conversations[order[self.index]]
        self.index += 1
        return render_conversation(self.tokenizer, conversation, max_tokens=self.seq_len + 1)

    def _rows(self) -> list[tuple[list[int], list[int]]]:
        row_len = self.seq_len + 1
        if not self.pack:
            return [self._next_rendered() for _ in range(self.batch_size)]
        rows, ids, mask = [], [], []
        while len(rows) < self.batch_size:
            more_ids, more_mask = self._next_rendered()
            ids, mask = ids + more_ids, mask + more_mask
            while len(ids) >= row_len and len(rows) < self.batch_size:
                rows.append((ids[:row_len], mask[:row_len]))
                ids, mask = ids[row_len:], mask[row_len:]
        return rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows()
        width = self.seq_len + 1 if self.pack else max(len(ids) for ids, _ in rows)
        inputs = torch.full((len(rows), width), self.tokenizer.bos_token_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            inputs[r, : len(ids)] = torch.tensor(ids)
            targets[r, : len(ids)] = torch.tensor([t if m else -1 for t, m in zip(ids, mask, strict=True)])
        x, y = inputs[:, :-1], targets[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
