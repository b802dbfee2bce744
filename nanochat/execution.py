"""Run a piece of model-written Python in a separate, limited process (for HumanEval-style tasks).

    result = run_python(program_and_tests, timeout=5.0)
    result.passed      # exited with status 0 within the time limit
    result.stdout, result.stderr, result.timed_out

NOT A SECURITY BOUNDARY. The code runs as the current user, on this machine, with its network.
What is here protects against accidents of a model that writes wrong code (an infinite loop, a
runaway allocation, a fork loop, a stray `shutil.rmtree`, reading stdin), not against a model or
a data set written to do harm: the same caveat as OpenAI's human-eval. Run untrusted code inside a
container or VM with no credentials and no network.

What each run gets:
  * a fresh `python -I` interpreter (isolated mode: no PYTHON* variables, no user site, the
    script's folder not on sys.path), in its own session and process group, started in a new
    empty temporary directory that is deleted afterwards, with a minimal environment (PATH,
    locale, HOME and TMPDIR = that directory)
  * stdin at end-of-file; stdout and stderr go to files and come back cut to `max_output`
    characters each
  * a wall-clock timeout after which the whole process group is killed
  * rlimits, set by a prelude before the program starts: address space (`max_memory`), CPU
    seconds, size of any file written (stdout and stderr included), no core dumps and, with the
    guard on, the number of processes (RLIMIT_NPROC counts per user and root is exempt)
  * with guard=True (the default) the prelude also replaces process-spawning and file-deleting
    functions (os.system, os.fork, subprocess.Popen, os.remove, shutil.rmtree, ...) with ones that
    raise PermissionError; pass guard=False for code that legitimately needs them.
Tracebacks show the program's own file name (program.py) and line numbers, not the prelude's.
The limits are set in the child rather than through `preexec_fn`, which can deadlock when the
calling process has threads (a training loop with data-loading threads, Ray).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_MEMORY = 1024**3  # bytes of address space: plenty for test snippets, stops runaway allocations
DEFAULT_MAX_OUTPUT = 16_384  # characters of stdout / stderr kept
MAX_FILE_BYTES = 16 * 1024**2  # any one file the program writes, stdout/stderr included
MAX_PROCESSES = 64  # RLIMIT_NPROC, counted per user: it stops fork loops
PROGRAM_FILE = "program.py"
TRUNCATED = "\n... [output truncated]"

# Runs first in the child, then hands over to program.py with runpy. `limits` is a list of
# (resource name, value); `guard` says whether to disable the destructive functions.
_PRELUDE = """
import runpy, sys

def _set_limits(limits):
    try:
        import resource
    except ImportError:  # not a POSIX system: the wall-clock timeout still applies
        return
    for name, value in limits:
        kind = getattr(resource, name, None)
        if kind is None:
            continue
        try:
            soft, hard = resource.getrlimit(kind)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # a limit this platform does not enforce (e.g. RLIMIT_AS on macOS)
            pass

def _disable_destructive_calls():
    import os, shutil, subprocess

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the nanochat code sandbox")
        return refuse

    for module, names in (
        (os, ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe",
              "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn",
              "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
              "truncate", "chmod", "chown", "lchown", "chroot", "setuid", "setgid")),
        (shutil, ("rmtree", "move", "chown")),
        (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, disabled(module.__name__ + "." + name))

_set_limits(%(limits)r)
if %(guard)r:
    _disable_destructive_calls()
del _set_limits, _disable_destructive_calls
sys.argv = [%(program)r]
try:
    runpy.run_path(%(program)r, run_name="__main__")
except SystemExit:
    raise
except BaseException:  # the traceback from the program's first frame on, without the prelude's
    import traceback
    _type, _value, _tb = sys.exc_info()
    while _tb is not None and _tb.tb_frame.f_code.co_filename != %(program)r:
        _tb = _tb.tb_next
    traceback.print_exception(_type, _value, _tb)
    sys.exit(1)
"""


@dataclass
class ExecutionResult:
    passed: bool  # exit status 0 within the time limit
    stdout: str
    stderr: str
    timed_out: bool


def _read_truncated(path: Path, max_chars: int) -> str:
    with open(path, "rb") as f:
        data = f.read(4 * max_chars + 4)  # UTF-8 takes at most 4 bytes a character
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= max_chars else text[:max_chars] + TRUNCATED


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(
    code: str,
    timeout: float = 5.0,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    max_output: int = DEFAULT_MAX_OUTPUT,
    guard: bool = True,
) -> ExecutionResult:
    """Run `code` as a program in a fresh limited interpreter and report how it went.

    This guards against accidents, it is not a security boundary against malicious code (see the
    module docstring). `max_memory=None` lifts the address-space limit (e.g. for numpy's threads)."""
    limits = [("RLIMIT_CPU", int(timeout) + 1), ("RLIMIT_FSIZE", MAX_FILE_BYTES), ("RLIMIT_CORE", 0)]
    if max_memory is not None:
        limits.append(("RLIMIT_AS", int(max_memory)))
    if guard:
        limits.append(("RLIMIT_NPROC", MAX_PROCESSES))
    prelude = _PRELUDE % {"limits": limits, "guard": guard, "program": PROGRAM_FILE}

    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as scratch:
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        (workdir / PROGRAM_FILE).write_text(code, encoding="utf-8")
        out_path, err_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", prelude], cwd=workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # its own process group, so the kill reaches its children too
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also ends whatever the program left running in the background
                proc.wait()
        return ExecutionResult(
            passed=proc.returncode == 0 and not timed_out,
            stdout=_read_truncated(out_path, max_output),
            stderr=_read_truncated(err_path, max_output),
            timed_out=timed_out,
        )
