"""One definition per stage: a dataclass of settings turned into command-line flags.

Each field becomes `--field-name` with its default and the help text from `field(metadata=...)`;
booleans get `--x/--no-x`; a `choices` entry in the metadata restricts values. `--config FILE.json`
loads values (e.g. a tuned `best_config.json`) that explicit flags still override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nanochat.precision import DTYPE_CHOICES

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its command-line help (and optional `choices`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class CommonConfig:
    """Settings every training, eval and chat script shares."""

    dtype: str = option("auto", "compute dtype; auto picks per device (see python -m nanochat.precision)", choices=DTYPE_CHOICES)
    device: str = option("", "cuda | cpu | mps; empty = the best available")
    seed: int = option(42, "random seed for init and sampling")


def int_list(text: str) -> list[int]:
    """A comma-separated option as integers (empty parts skipped)."""
    return [int(v) for v in text.split(",") if v.strip()]


def row_counts(text: str, flag: str, example: str) -> list[int]:
    """A comma-separated option of row counts (e.g. --num-samples 1,32) as numbers; anything but
    positive integers is refused, naming the option."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"{flag} {text!r}: give comma-separated positive row counts, e.g. {example}")
    return counts


def _flag_type(tp: Any) -> Any:
    if tp in (int, float, str):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]  # Optional[X] -> X
    if len(args) == 1 and args[0] in (int, float, str):
        return args[0]
    raise TypeError(f"config field type {tp!r} has no command-line form")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="JSON file of settings (e.g. best_config.json); flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        # argparse %-formats help strings (for %(default)s): a literal % must be doubled
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "").replace("%", "%%"), "dest": f.name}
        if hints[f.name] is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(name, type=_flag_type(hints[f.name]), **kwargs)
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse argv into an instance of the dataclass `cls` (defaults < --config JSON < flags)."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    if args.config is not None:
        values = json.loads(args.config.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{args.config}: unknown settings {unknown}; known: {sorted(known)}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return cls(**{k: v for k, v in vars(args).items() if k != "config"})


@dataclass
class ModelShapeConfig(CommonConfig):
    """The model's shape: one knob (--depth) and the ratios that derive the rest from it."""

    depth: int = option(12, "transformer layers; width = depth * aspect_ratio rounded up to head_dim")
    aspect_ratio: int = option(64, "model width per layer of depth")
    head_dim: int = option(128, "attention head dimension")
    max_seq_len: int = option(2048, "context length T")
