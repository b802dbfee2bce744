"""Byte-level BPE tokenizer: trained with rustbpe, encoded with tiktoken.

Training runs in Rust (`rustbpe`, or HF `tokenizers` when rustbpe is missing and tokenizers is
installed); the result is a table of mergeable ranks plus a split regex, which is exactly what a
`tiktoken.Encoding` needs, so encoding at train/serve time is tiktoken-fast.

On disk (a directory, default `$NANOCHAT_BASE_DIR/tokenizer`):
  tokenizer.json   {"format", "pattern", "mergeable_ranks": [base64 token bytes, index = rank],
                    "special_tokens": {name: id}}
  token_bytes.pt   int32 tensor [vocab_size]: UTF-8 byte length of each token, 0 for special tokens

Create one with `python -m nanochat.scripts.tok_train`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from nanochat.common import base_dir
from nanochat.errors import UsageError

try:
    import rustbpe
except ImportError:  # training falls back to HF tokenizers; encoding only needs tiktoken
    rustbpe = None

# The chat special tokens. They take the last ids, after all mergeable ranks.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; documents are delimited by it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]
BOS_TOKEN = "<|bos|>"

# GPT-4's split regex, except digits are grouped by at most 2 (not 3): at small vocab sizes
# number chunks would otherwise eat a large share of the vocabulary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FILE_FORMAT = "nanochat-bpe-v1"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
TRAIN_COMMAND = "python -m nanochat.scripts.tok_train"


class TokenizerError(UsageError, ValueError):
    """A saved tokenizer that cannot be read; the message says how to make a new one."""


class MissingTokenizerError(TokenizerError, FileNotFoundError):
    """No tokenizer where one was looked for (a FileNotFoundError too, for callers that catch that)."""


def default_tokenizer_dir() -> Path:
    """Where `tok_train` saves and the training scripts load the tokenizer by default."""
    return base_dir() / "tokenizer"


# -----------------------------------------------------------------------------
# training backends: both return {token bytes: rank} with ranks 0..n-1


def _train_ranks_rustbpe(texts: Iterable[str], num_ranks: int) -> dict[bytes, int]:
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


def _byte_level_alphabet() -> dict[str, int]:
    """HF ByteLevel's printable stand-in character for each byte value (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    stand_ins = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in stand_ins:
            stand_ins[b] = chr(next_free)
            next_free += 1
    return {char: b for b, char in stand_ins.items()}


def _train_ranks_hf(texts: Iterable[str], num_ranks: int) -> dict[bytes, int]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_ranks,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    # HF ids follow merge order (256 bytes first), which is the rank order tiktoken needs.
    char_to_byte = _byte_level_alphabet()
    vocab = hf.get_vocab()
    return {bytes(char_to_byte[c] for c in token): rank for token, rank in vocab.items()}


def _train_ranks(texts: Iterable[str], num_ranks: int) -> dict[bytes, int]:
    if rustbpe is not None:
        return _train_ranks_rustbpe(texts, num_ranks)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "Tokenizer training needs `rustbpe` (preferred) or HF `tokenizers`, and neither is "
            "installed: run `pip install rustbpe`."
        ) from None
    return _train_ranks_hf(texts, num_ranks)


# -----------------------------------------------------------------------------


class Tokenizer:
    """A trained BPE vocabulary plus the chat special tokens, backed by a tiktoken Encoding."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
            raise ValueError("mergeable ranks must be exactly 0..n-1 (one id per token, no gaps)")
        self._ranks = mergeable_ranks
        self._pattern = pattern
        self.directory: Path | None = None  # where it was loaded from or saved to (absolute): checkpoints record it
        first_special = len(mergeable_ranks)
        self._special_ids = {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._bytes_table: list[bytes] | None = None
        self._enc = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_ids,
        )

    # --- creation ------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn a vocabulary of exactly `vocab_size` ids, special tokens included."""
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} "
                f"special tokens need at least {256 + len(SPECIAL_TOKENS)}."
            )
        ranks = _train_ranks(texts, num_ranks)
        if len(ranks) != num_ranks:
            raise ValueError(
                f"training learned only {len(ranks) - 256} merges, {num_ranks - 256} were needed for "
                f"vocab_size={vocab_size}: the training text is too small; give more text or a smaller vocab_size."
            )
        return cls(ranks)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load what `save` wrote; a missing or damaged file raises with what to do about it."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise MissingTokenizerError(f"no tokenizer at {path}: train one with `{TRAIN_COMMAND} --out {directory}`.")
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("format") != FILE_FORMAT:
                raise ValueError(f"format is {saved.get('format')!r}, expected {FILE_FORMAT!r}")
            ranks = {base64.b64decode(token): rank for rank, token in enumerate(saved["mergeable_ranks"])}
            tokenizer = cls(ranks, saved["pattern"])
            if saved["special_tokens"] != tokenizer._special_ids:
                raise ValueError("its special tokens differ from this code's SPECIAL_TOKENS")
        except (ValueError, KeyError, TypeError) as err:
            raise TokenizerError(
                f"tokenizer file {path} is unreadable ({err}): retrain it with `{TRAIN_COMMAND} --out {directory}`."
            ) from err
        tokenizer.directory = Path(directory).resolve()
        return tokenizer

    @staticmethod
    def saved_in(directory: str | Path) -> bool:
        """Whether `directory` holds a saved tokenizer (without reading it)."""
        return (Path(directory) / TOKENIZER_FILE).is_file()

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and token_bytes.pt into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokens_by_rank = sorted(self._ranks, key=self._ranks.__getitem__)
        saved = {
            "format": FILE_FORMAT,
            "pattern": self._pattern,
            "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token in tokens_by_rank],
            "special_tokens": self._special_ids,
        }
        # Write-then-rename so a crash never leaves a half-written tokenizer behind.
        tmp = directory / (TOKENIZER_FILE + ".tmp")
        tmp.write_text(json.dumps(saved), encoding="utf-8")
        os.replace(tmp, directory / TOKENIZER_FILE)
        tmp = directory / (TOKEN_BYTES_FILE + ".tmp")
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, directory / TOKEN_BYTES_FILE)
        self.directory = directory.resolve()

    # --- properties ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self._special_ids[BOS_TOKEN]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    # --- encoding ------------------------------------------------------------

    def encode_special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token strings in it are treated as plain text).

        A list is encoded in one multithreaded batch call. `prepend`/`append` add one special
        token (by name or id) around each text.
        """
        prefix = [] if prepend is None else [self._as_id(prepend)]
        suffix = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return prefix + self._enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            batch = self._enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + ids + suffix for ids in batch]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of `ids` (a token may hold part of a character: decode() shows it as U+FFFD)."""
        return self._enc.decode_bytes(ids)

    def bytes_table(self) -> list[bytes]:
        """The bytes of every id (a special token's: its name), built on first use. A stream that decodes
        one token at a time looks them up here: tiktoken's decode releases the GIL at each call, and a
        server's event loop, busy with other threads, waits to get it back (13% of a replica's time at
        32 streams on an H200, profiled)."""
        if self._bytes_table is None:
            table = [b""] * (len(self._ranks) + len(self._special_ids))
            for piece, i in self._ranks.items():
                table[i] = piece
            for name, i in self._special_ids.items():
                table[i] = name.encode()
            self._bytes_table = table
        return self._bytes_table

    # --- derived tables ------------------------------------------------------

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: bytes each token stands for, 0 for special tokens (for bits per byte)."""
        lengths = torch.zeros(self.vocab_size, dtype=torch.int32)
        for token, rank in self._ranks.items():
            lengths[rank] = len(token)
        return lengths

    def fingerprint(self) -> str:
        """16 hex chars identifying ranks + pattern + special tokens; equal tokenizers agree."""
        digest = hashlib.sha256()
        digest.update(self._pattern.encode("utf-8"))
        for token in sorted(self._ranks, key=self._ranks.__getitem__):
            digest.update(len(token).to_bytes(2, "little") + token)
        digest.update(json.dumps(self._special_ids, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"
