"""The text of an answer as its tokens arrive, for a terminal or an HTTP stream. Rule: each
segment (text, a calculator call, its output) comes out as if decoded whole at every token, only the
new suffix handed out, a trailing U+FFFD (a character split across tokens) held until it completes;
but only the tokens since the last complete character are decoded, so each token costs the same
however long the answer (the prefix/read offsets of vLLM's incremental detokenizer)."""

from __future__ import annotations

from nanochat.tokenizer import Tokenizer


class AnswerStream:
    """Turns the engine's tokens, one at a time, into text to print and into the assistant message;
    calculator calls read "[calculator: 3*4] [= 12]"."""

    _OPEN = {"python": "[calculator: ", "python_output": " [= "}
    _CLOSE = {"text": "", "python": "]", "python_output": "]"}

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self._starts = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self._ends = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.tokens: list[int] = []  # the whole answer, markers included
        self.parts: list[dict] = []  # finished segments, as an assistant message's content parts
        self._new_segment("text")

    def _new_segment(self, kind: str) -> None:
        self._kind, self._segment, self._pieces = kind, [], []
        # the window: the segment's tokens from `_start` on, of whose text `_shown` characters are out.
        # UTF-8 resynchronises after a complete character, so decoding from there gives what decoding
        # the whole segment would give after the text already out
        self._start, self._shown = 0, 0

    def _new_text(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self._segment[self._start:])
        ready = text if final else text.rstrip("\ufffd")
        piece, self._shown = ready[self._shown:], max(self._shown, len(ready))
        if not text.endswith("\ufffd"):  # no character is pending: the next window starts here
            self._start, self._shown = len(self._segment), 0
        self._pieces.append(piece)
        return piece

    def _close_segment(self) -> str:
        piece = self._new_text(final=True)
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
        return self._new_text()

    def finish(self) -> str:
        """Flush what is held back; return the last text to print."""
        return self._close_segment() if self._segment or self._kind != "text" else ""

    @property
    def text(self) -> str:
        """The answer as Engine.complete writes it: tool calls in their special-token text."""
        return self.tokenizer.decode(self.tokens)
