"""The text of an answer as its tokens arrive, for a terminal or an HTTP stream. Rule: each
segment (text, a calculator call, its output) comes out as it decodes whole, piece by piece: each
token's bytes go through an incremental UTF-8 decoder, which holds the bytes of a character split
across tokens until it completes and turns bytes that can never form one into U+FFFD at once (as
decoding whole does). So each token costs the same however long the answer, garbage included."""

from __future__ import annotations

import codecs

from nanochat.tokenizer import Tokenizer

_UTF8 = codecs.getincrementaldecoder("utf-8")


class AnswerStream:
    """Turns the engine's tokens, one at a time, into text to print and into the assistant message;
    calculator calls read "[calculator: 3*4] [= 12]"."""

    _OPEN = {"python": "[calculator: ", "python_output": " [= "}
    _CLOSE = {"text": "", "python": "]", "python_output": "]"}

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._bytes = tokenizer.bytes_table()
        special = tokenizer.encode_special
        self._starts = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self._ends = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.tokens: list[int] = []  # the whole answer, markers included
        self.parts: list[dict] = []  # finished segments, as an assistant message's content parts
        self._new_segment("text")

    def _new_segment(self, kind: str) -> None:
        self._kind, self._segment, self._pieces = kind, [], []
        self._utf8 = _UTF8(errors="replace")  # errors as in Tokenizer.decode

    def _new_text(self, token_bytes: bytes, final: bool = False) -> str:
        piece = self._utf8.decode(token_bytes, final)
        self._pieces.append(piece)
        return piece

    def _close_segment(self) -> str:
        piece = self._new_text(b"", final=True)
        if self._segment:
            self.parts.append({"type": self._kind, "text": "".join(self._pieces)})
        piece += self._CLOSE[self._kind]
        self._new_segment("text")
        return piece

    def feed(self, token: int) -> str:
        """Take the next answer token; return the text to print now."""
        self.tokens.append(token)
        if token in self._starts:
            piece = self._close_segment()
            self._new_segment(self._starts[token])
            return piece + self._OPEN[self._kind]
        if token in self._ends and self._ends[token] == self._kind:
            return self._close_segment()
        self._segment.append(token)
        return self._new_text(self._bytes[token])

    def finish(self) -> str:
        """Flush what is held back; return the last text to print."""
        return self._close_segment() if self._segment or self._kind != "text" else ""

    @property
    def text(self) -> str:
        """The answer as Engine.complete writes it: tool calls in their special-token text."""
        return self.tokenizer.decode(self.tokens)
