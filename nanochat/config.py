"""The one configuration mechanism of every entry point: a dataclass of settings turned into flags.

Each field becomes `--field-name` with its default and the help text from `field(metadata=...)`;
booleans get `--x/--no-x`, lists a repeatable flag; other metadata (`choices`, `metavar`) goes to
argparse as is. `--config FILE.json` loads values (e.g. a tuned `best_config.json`) that explicit
flags still override. Entry points with subcommands give one dataclass per command (`parse_command`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nanochat.errors import DEBUG_ENV, DEBUG_FLAG

T = TypeVar("T")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # --dtype; nanochat/precision.py maps them to torch


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its command-line help (and optional `choices`, `metavar`)."""
    if isinstance(default, list):  # a repeatable flag: each instance gets its own list
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
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


def row_counts(text: str, flag: str, example: str, what: str = "row counts") -> list[int]:
    """A comma-separated option of row counts (e.g. --num-samples 1,32; or of other sizes, named by
    `what`) as numbers; anything but positive integers is refused, naming the option."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"{flag} {text!r}: give comma-separated positive {what}, e.g. {example}")
    return counts


def _flag_type(tp: Any) -> Any:
    if tp in (int, float, str):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]  # Optional[X] -> X
    if len(args) == 1 and args[0] in (int, float, str):
        return args[0]
    raise TypeError(f"config field type {tp!r} has no command-line form")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` in the parser's help; nanochat.errors.run_main acts on it before any flag is parsed."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a mistake that otherwise ends in one line (or set {DEBUG_ENV}=1)")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--config`, `--debug` and one flag per field of the dataclass `cls`."""
    parser.add_argument("--config", type=Path, help="JSON file of settings (e.g. best_config.json); flags override it")
    add_debug_flag(parser)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # argparse %-formats help strings (for %(default)s): a literal % must be doubled
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "").replace("%", "%%"), "dest": f.name}
        kwargs.update({k: v for k, v in f.metadata.items() if k != "help"})
        if hints[f.name] is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(hints[f.name]) is list:
            parser.add_argument(name, action="append", type=_flag_type(typing.get_args(hints[f.name])[0]), **kwargs)
        else:
            parser.add_argument(name, type=_flag_type(hints[f.name]), **kwargs)


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse argv into an instance of the dataclass `cls` (defaults < --config JSON < flags)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, cls)
    return _settings(cls, parser, parser, argv)


def parse_command(commands: dict[str, type], argv: list[str] | None = None,
                  description: str | None = None) -> tuple[str, Any]:
    """`COMMAND --flags`, one dataclass per command: (the command, its settings)."""
    parser = argparse.ArgumentParser(description=description)
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, cls in commands.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        add_flags(subparsers.add_parser(name, help=summary, description=summary,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter), cls)
    command = parser.parse_args(argv).command
    return command, _settings(commands[command], parser, subparsers.choices[command], argv)


def _settings(cls: type[T], parser: argparse.ArgumentParser, flags: argparse.ArgumentParser,
              argv: list[str] | None) -> T:
    """The dataclass from parsed flags; a --config file's values become the defaults of `flags`."""
    args = parser.parse_args(argv)
    known = {f.name for f in dataclasses.fields(cls)}
    if args.config is not None:
        values = json.loads(args.config.read_text())
        unknown = sorted(set(values) - known)
        if unknown:
            flags.error(f"{args.config}: unknown settings {unknown}; known: {sorted(known)}")
        flags.set_defaults(**values)
        args = parser.parse_args(argv)
    return cls(**{k: v for k, v in vars(args).items() if k in known})


@dataclass
class ModelShapeConfig(CommonConfig):
    """The model's shape: one knob (--depth) and the ratios that derive the rest from it."""

    depth: int = option(12, "transformer layers; width = depth * aspect_ratio rounded up to head_dim")
    aspect_ratio: int = option(64, "model width per layer of depth")
    head_dim: int = option(128, "attention head dimension")
    max_seq_len: int = option(2048, "context length T")
