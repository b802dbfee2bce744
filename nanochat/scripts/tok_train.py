"""Train the BPE tokenizer on the training shards (never the validation shard).

Full size (a GPU node's CPU does this; the GPU is not used):
    python -m nanochat.scripts.tok_train --vocab-size 32768 --max-chars 2_000_000_000
Tiny, on a laptop, with the embedded corpus:
    python -m nanochat.dataset build && python -m nanochat.scripts.tok_train --vocab-size 4096
On a Ray cluster:
    ray job submit --working-dir . -- python -m nanochat.scripts.tok_train --vocab-size 32768

Reads `--data-dir` (default $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data) and writes tokenizer.json
+ token_bytes.pt to `--out` (default $NANOCHAT_BASE_DIR/tokenizer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nanochat.config import option, parse_config
from nanochat.dataset import default_data_dir, split_shards
from nanochat.shardfs import Source, list_shards, num_row_groups, read_row_group
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir


def training_texts(shards: list[Source], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents of `shards` in order, each cut to `doc_cap` chars, until `max_chars` in total."""
    seen = 0
    for shard in shards:
        for row_group in range(num_row_groups(shard)):
            for doc in read_row_group(shard, row_group):
                doc = doc[:doc_cap]
                yield doc
                seen += len(doc)
                if seen >= max_chars:
                    return


@dataclass
class TokTrainConfig:
    vocab_size: int = option(32768, "total ids, special tokens included")
    max_chars: int = option(2_000_000_000, "train on at most this many characters")
    doc_cap: int = option(10_000, "use at most this many characters per document")
    data_dir: str = option("", "shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    out: str = option("", "output dir; empty = $NANOCHAT_BASE_DIR/tokenizer")


def main(argv: list[str] | None = None) -> None:
    # --- arguments -----------------------------------------------------------
    args = parse_config(TokTrainConfig, argv, description="Train the BPE tokenizer on the training shards.")
    data_dir = args.data_dir or default_data_dir()  # a folder, a URI or a URL list (nanochat.shardfs)
    out = Path(args.out or default_tokenizer_dir())

    # --- train ---------------------------------------------------------------
    shards = split_shards(list_shards(data_dir), "train")
    print(f"training a {args.vocab_size}-token vocabulary on {len(shards)} train shards in {data_dir}")
    texts = training_texts(shards, args.max_chars, args.doc_cap)
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    elapsed = time.perf_counter() - start

    # --- save and summarize --------------------------------------------------
    tokenizer.save(out)
    token_bytes = tokenizer.token_bytes()
    ordinary = token_bytes[token_bytes > 0].float()
    print(
        f"trained in {elapsed:.1f} s: vocab_size={tokenizer.vocab_size}, fingerprint={tokenizer.fingerprint()}"
    )
    print(f"token length in bytes: mean {ordinary.mean():.2f}, max {int(ordinary.max())}")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
