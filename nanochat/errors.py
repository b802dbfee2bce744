"""How entry points fail: a mistake the user can fix is one line and exit status 2; a bug keeps its traceback.

Every `python -m` entry point ends with

    if __name__ == "__main__":
        run_main(main)

A user error (one of `user_error_types()`, found in the exception or in what it wraps, or a
`SystemExit("message")`) prints `error: <message>` on stderr, where the message says what went wrong
and what to do, and exits with 2, argparse's status for a bad command line. Anything else is a bug
and gets Python's traceback. `--debug` anywhere on the command line, or NANOCHAT_DEBUG=1, shows the
traceback of user errors too (and passes on to the processes the entry point starts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NANOCHAT_DEBUG"
USER_ERROR_EXIT = 2


class UsageError(Exception):
    """A mistake the user can fix (a path, a flag, a busy port); the message says what to do.

    `details` (e.g. a table of what the cluster has) are printed on stdout above the one-line message."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message, details)
        self.message, self.details = message, details

    def __str__(self) -> str:
        return f"{self.message}\n{self.details}" if self.details else self.message

    def __reduce__(self):
        # rebuilt from the message as raised: Ray Data appends its retry advice to an exception's args
        # on its way through a map task, and a user error must reach the driver as it was written
        return type(self), (self.message, self.details), self.__dict__


def user_error_types() -> tuple[type[BaseException], ...]:
    """The error classes that mean the user's input is wrong, each raised with a message that says what to do:
    UsageError and its subclasses (CheckpointError, DataError, TokenizerError, PrecisionError, ...), which
    live next to the code that raises them."""
    return (UsageError,)


def no_wrapped(error: BaseException) -> Iterable[BaseException]:
    return ()


def find_user_error(error: BaseException,
                    wrapped: Callable[[BaseException], Iterable[BaseException]] = no_wrapped) -> BaseException | None:
    """The first user error in `error`, its `__cause__` chain and what `wrapped(error)` says it wraps
    (e.g. the worker errors inside a Ray error), or None when the failure is not the user's."""
    kinds = user_error_types()
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = list(wrapped(current))
        if inner:  # a wrapper's text is the inner error's traceback: the inner error speaks for it
            pending.extend(inner)
            continue
        if isinstance(current, kinds):
            return current
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return None


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(error: BaseException) -> None:
    """Print a user error: its details (if any) on stdout, then `error: <message>` as one line on stderr."""
    details = getattr(error, "details", "")
    if details:
        print(details, flush=True)
    message = error.message if isinstance(error, UsageError) else str(error)
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def run_main(main: Callable[[list[str]], object],
             wrapped: Callable[[BaseException], Iterable[BaseException]] = no_wrapped) -> None:
    """Run an entry point's `main(argv)` under the convention above; `wrapped` unwraps errors of a
    framework that carries the original error inside its own (ray_jobs passes Ray's)."""
    argv = sys.argv[1:]
    if DEBUG_FLAG in argv:
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    try:
        main(argv)
    except SystemExit as stop:
        if not isinstance(stop.code, str) or debugging():
            raise
        report(stop)
        raise SystemExit(USER_ERROR_EXIT) from None
    except Exception as error:
        found = None if debugging() else find_user_error(error, wrapped)
        if found is None:
            raise
        report(found)
        raise SystemExit(USER_ERROR_EXIT) from None
