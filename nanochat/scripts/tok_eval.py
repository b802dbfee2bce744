"""Compare our tokenizer's compression (bytes per token) with GPT-2's and GPT-4's on the val shard.

Full size:
    python -m nanochat.scripts.tok_eval
Tiny, on a laptop (after `python -m nanochat.dataset build` and a small tok_train):
    python -m nanochat.scripts.tok_eval --max-docs 200
On a Ray cluster:
    ray job submit --working-dir . -- python -m nanochat.scripts.tok_eval

tiktoken downloads the "gpt2" and "cl100k_base" tables on first use; offline, those rows are
skipped with a note (ours is always evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

from nanochat.config import option, parse_config
from nanochat.dataset import default_data_dir, split_shards
from nanochat.shardfs import Source, list_shards, num_row_groups, read_row_group
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

REFERENCE_ENCODINGS = ["gpt2", "cl100k_base"]


def validation_texts(data_dir: Source, max_docs: int | None) -> list[str]:
    (val_shard,) = split_shards(list_shards(data_dir), "val")
    docs = [doc for g in range(num_row_groups(val_shard)) for doc in read_row_group(val_shard, g)]
    return docs[:max_docs]


def bytes_per_token(encode_batch, texts: list[str]) -> tuple[int, float]:
    """(total tokens, UTF-8 bytes per token) of `texts` under `encode_batch`."""
    num_tokens = sum(len(ids) for ids in encode_batch(texts))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return num_tokens, num_bytes / max(num_tokens, 1)


@dataclass
class TokEvalConfig:
    data_dir: str = option("", "shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    tokenizer_dir: str = option("", "empty = $NANOCHAT_BASE_DIR/tokenizer")
    max_docs: int | None = option(None, "evaluate on at most this many val documents")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(TokEvalConfig, argv, description="Compression ratio of our tokenizer vs GPT-2 and GPT-4 (cl100k_base).")
    texts = validation_texts(args.data_dir or default_data_dir(), args.max_docs)
    ours = Tokenizer.load(args.tokenizer_dir or default_tokenizer_dir())
    print(f"{len(texts)} val documents, {sum(len(t.encode('utf-8')) for t in texts):,} bytes")
    print(f"{'tokenizer':<14}{'vocab':>9}{'tokens':>12}{'bytes/token':>13}")
    tokens, ratio = bytes_per_token(ours.encode, texts)
    print(f"{'ours':<14}{ours.vocab_size:>9}{tokens:>12,}{ratio:>13.3f}")
    for name in REFERENCE_ENCODINGS:
        try:
            reference = tiktoken.get_encoding(name)
        except Exception as err:  # a failed download surfaces as several exception types
            print(f"{name:<14} skipped: tiktoken could not load it (offline? {type(err).__name__})")
            continue
        tokens, ratio = bytes_per_token(reference.encode_ordinary_batch, texts)
        print(f"{name:<14}{reference.n_vocab:>9}{tokens:>12,}{ratio:>13.3f}")


if __name__ == "__main__":
    main()
