"""Run a piece of model-written Python in a separate, isolated process (for HumanEval-style tasks).

    result = run_python(program_and_tests, timeout=5.0)
    result.passed      # ran to its last line and exited with status 0 within the time limit
    result.stdout, result.stderr, result.timed_out, result.isolation.statement()

The rule a reader must know: `passed` means the program *reached its end*. After the program's last
statement a prelude writes a fresh random token that only it holds; an exit before that
(sys.exit(0), os._exit(0), a killed interpreter) is a failure even with status 0.

Each run starts a launcher (this file, run as a script) that isolates what the machine allows and
says what it got (`result.isolation`, logged once per process, docs in README "HumanEval"):
  * user: as root the program runs as nobody (uid/gid 65534, no supplementary groups); when the
    interpreter sits under a folder nobody may not enter (e.g. /root), that folder is hidden by an
    empty tmpfs in a private mount namespace and only the interpreter (and the work folder) are
    bound back. Not root: the program runs as the current user.
  * network: its own network namespace (no interface but a loopback that is down). Root enters
    it directly; a user, or a root without CAP_SYS_ADMIN, through a new user namespace if allowed.
  * processes: its own PID namespace, whose first process is the program: when it ends, the kernel
    kills everything it started, setsid or not. Without one, the launcher is a child subreaper
    (orphans reparent to it) and kills its descendants until none is left.
  * limits: wall-clock timeout, and rlimits on address space, CPU seconds, file size, core dumps and
    (guard=True) the number of processes (counted per user: concurrent runs as nobody share it);
    a fresh `python -I` in a new empty temporary folder with a minimal environment, stdin at
    end-of-file, stdout/stderr cut to `max_output` characters.
  * guard=True (the default) also replaces process-spawning and file-deleting functions of os,
    posix, shutil and subprocess with ones that raise PermissionError: a speed bump against
    accidents (ctypes goes around it), the isolation above is the boundary.
Not isolated: the file system beyond the user's permissions (nobody may read world-readable files,
and write world-writable folders such as /tmp), the kernel (no seccomp), and the pass token from a
program that searches its own interpreter's memory for it (frames, gc, /proc/self/mem).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 1024**3  # bytes of address space: plenty for test snippets, stops runaway allocations
DEFAULT_MAX_OUTPUT = 16_384  # characters of stdout / stderr kept
MAX_FILE_BYTES = 16 * 1024**2  # any one file the program writes, stdout/stderr included
MAX_PROCESSES = 64  # RLIMIT_NPROC, counted per user: it stops fork loops
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
PROGRAM_FILE = "program.py"
TRUNCATED = "\n... [output truncated]"
LAUNCH_GRACE = 10.0  # seconds the launcher may take beyond `timeout` before it is killed as well
SWEEP_SECONDS = 5.0  # how long the launcher keeps killing reparented descendants

# Linux constants (sched.h, prctl.h, mount.h): os.unshare is 3.12+ and there is no os.mount, so libc it is.
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

# Runs first in the sandboxed interpreter: takes the pass token from a pipe (never on disk, in argv
# or in the environment), runs program.py, and writes the token only if the program reached its end.
_PRELUDE = """
import os, runpy, sys

def _disable_destructive_calls():
    import posix, shutil, subprocess, _posixsubprocess

    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the nanochat code sandbox")
        return refuse

    process_and_file_calls = (
        "system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe", "execl",
        "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp",
        "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
        "lchown", "chroot", "setuid", "setgid")
    for module, names in (
        (os, process_and_file_calls),
        (posix, process_and_file_calls),  # os re-exports posix: patching os alone leaves posix.system open
        (shutil, ("rmtree", "move", "chown")),
        (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")),
        (_posixsubprocess, ("fork_exec",)),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, disabled(module.__name__ + "." + name))

def _run(token_fd, guard, program):
    token = os.read(token_fd, 256)
    os.close(token_fd)
    if guard:
        _disable_destructive_calls()
    sys.argv = [program]
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit:
        raise
    except BaseException:  # the traceback from the program's first frame on, without the prelude's
        import traceback
        _type, _value, _tb = sys.exc_info()
        while _tb is not None and _tb.tb_frame.f_code.co_filename != program:
            _tb = _tb.tb_next
        traceback.print_exception(_type, _value, _tb)
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\\n" + token + b"\\n")

_run(%(token_fd)d, %(guard)r, %(program)r)
"""


@dataclass(frozen=True)
class Isolation:
    """What one run got: the launcher probes each piece and says why one is missing (`notes`)."""

    uid: int  # the user the program ran as
    dropped_root: bool  # root was replaced by nobody
    network: bool  # own network namespace: no route anywhere, loopback included
    pid_namespace: bool  # the end of the program kills every process it started
    subreaper: bool  # without a PID namespace: orphans reparent to the launcher, which kills them
    notes: tuple[str, ...] = ()

    def statement(self) -> str:
        """One paragraph for the log and for a reader: what is isolated and what is not."""
        if self.dropped_root:
            user = f"as nobody (uid {self.uid}): it reads what any user may read, writes only world-writable places"
        elif self.uid == 0:
            user = "AS ROOT: it can read and change anything on this machine"
        else:
            user = f"as the current user (uid {self.uid}): it can read and change whatever that user can"
        network = "no network (own network namespace)" if self.network else "WITH the network of this machine"
        if self.pid_namespace:
            tree = "every process it starts is killed with it (own PID namespace)"
        elif self.subreaper:
            tree = "its processes are killed with it, setsid included (the launcher is their subreaper)"
        else:
            tree = "only its process group is killed: a child that calls setsid can outlive it"
        why = f" Why: {'; '.join(self.notes)}." if self.notes else ""
        return f"Model-written code runs {user}; {network}; {tree}.{why}"

    @property
    def complete(self) -> bool:
        return self.dropped_root and self.network and self.pid_namespace


@dataclass
class ExecutionResult:
    passed: bool  # reached its end (the pass token came back), exit status 0, within the time limit
    stdout: str
    stderr: str
    timed_out: bool
    returncode: int | None = None  # None when killed at the timeout; -N for signal N
    isolation: Isolation | None = field(default=None, repr=False)


_announced = False


def _announce(isolation: Isolation) -> None:
    """Log once per process what the sandbox isolates here (a warning when something is missing)."""
    global _announced
    if not _announced:
        _announced = True
        logger.log(logging.INFO if isolation.complete else logging.WARNING, isolation.statement())


def _read_truncated(path: Path, max_chars: int) -> str:
    with open(path, "rb") as f:
        data = f.read(4 * max_chars + 4)  # UTF-8 takes at most 4 bytes a character
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= max_chars else text[:max_chars] + TRUNCATED


def _strip_token(path: Path, token: str) -> bool:
    """Whether stdout ends with the token line the prelude writes last; removes that line if so."""
    suffix = f"\n{token}\n".encode()
    size = path.stat().st_size
    if size < len(suffix):
        return False
    with open(path, "rb") as f:
        f.seek(size - len(suffix))
        if f.read() != suffix:
            return False
    os.truncate(path, size - len(suffix))
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _interpreter() -> tuple[str, list[str]]:
    """The plain interpreter to run the program with (a venv adds nothing to `python -I`), and the
    folders it reads: its prefix (stdlib, libpython) and where the binary lives."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return python, sorted({os.path.realpath(sys.base_prefix), os.path.dirname(python)})


def run_python(
    code: str,
    timeout: float = 5.0,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    max_output: int = DEFAULT_MAX_OUTPUT,
    guard: bool = True,
) -> ExecutionResult:
    """Run `code` as a program in a fresh, isolated, limited interpreter and report how it went.

    `max_memory=None` lifts the address-space limit (e.g. for numpy's threads); `guard=False` allows
    spawning processes and deleting files (inside the sandbox). See the module docstring for what is
    isolated; `result.isolation.statement()` says what this machine allowed."""
    limits = [("RLIMIT_CPU", int(timeout) + 1), ("RLIMIT_FSIZE", MAX_FILE_BYTES), ("RLIMIT_CORE", 0)]
    if max_memory is not None:
        limits.append(("RLIMIT_AS", int(max_memory)))
    if guard:
        limits.append(("RLIMIT_NPROC", MAX_PROCESSES))
    token = secrets.token_hex(16)
    python, python_dirs = _interpreter()

    with tempfile.TemporaryDirectory(prefix="nanochat-exec-") as scratch:
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        (workdir / PROGRAM_FILE).write_text(code, encoding="utf-8")
        out_path, err_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        config = {
            "python": python, "needs": python_dirs + [str(workdir)], "workdir": str(workdir),
            "stdout": str(out_path), "stderr": str(err_path), "limits": limits, "timeout": timeout,
            "token": token, "guard": guard, "program": PROGRAM_FILE,
            "env": {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
                    "LC_ALL": "C.UTF-8"},
        }
        report = _launch(config, timeout + LAUNCH_GRACE)
        isolation = Isolation(**{**report["isolation"], "notes": tuple(report["isolation"]["notes"])})
        _announce(isolation)
        completed = _strip_token(out_path, token)
        return ExecutionResult(
            passed=completed and report["returncode"] == 0 and not report["timed_out"],
            stdout=_read_truncated(out_path, max_output),
            stderr=_read_truncated(err_path, max_output),
            timed_out=report["timed_out"],
            returncode=report["returncode"],
            isolation=isolation,
        )


def _launch(config: dict, limit: float) -> dict:
    """Start the launcher (this file as a script, in its own session), hand it the run, return its report."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", os.path.abspath(__file__)], cwd="/", env={"PATH": os.defpath},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # the backstop kill below reaches the launcher and its group
    )
    try:
        out, err = proc.communicate(json.dumps(config).encode(), timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
    finally:
        _kill_group(proc.pid)
    try:
        report = json.loads(out)
    except ValueError:
        raise RuntimeError(f"the code sandbox launcher failed (status {proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}") from None
    if report.get("setup_error"):
        raise RuntimeError(f"could not start the sandboxed program: {report['setup_error']}. "
                           "(as root the interpreter must be readable by nobody, uid 65534)")
    return report


# ----------------------------------------------------------------------------------------------
# The launcher: runs as its own process (this file as a script), single-threaded, so forking and
# changing namespaces are safe here and never in the caller (a training loop with threads, Ray).


def _libc_call(libc: ctypes.CDLL, name: str, *args) -> str | None:
    """Call a libc function; None on success, else why it failed."""
    function = getattr(libc, name, None)
    if function is None:
        return f"{name} is not available on this system"
    if function(*args) != 0:
        return f"{name}: {os.strerror(ctypes.get_errno())}"
    return None


def _unshare(libc: ctypes.CDLL, flags: int, what: str, notes: list[str]) -> bool:
    error = _libc_call(libc, "unshare", flags)
    if error:
        notes.append(f"no {what} namespace ({error})")
    return error is None


def _user_namespace(libc: ctypes.CDLL, root: bool) -> str | None:
    """Enter a new user namespace that keeps our ids; None on success, else why not. Anyone may map
    just themselves, which leaves no capability after exec. Root maps itself and nobody, so that the
    child can still become nobody: that takes CAP_SETUID outside, so a forked helper writes the map."""
    if not root:
        error = _libc_call(libc, "unshare", CLONE_NEWUSER)
        if error is None:
            uid, gid = os.geteuid(), os.getegid()
            try:
                Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
                Path("/proc/self/setgroups").write_text("deny")  # required before an unprivileged gid_map
                Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
            except OSError as e:
                error = f"cannot map our ids into it: {e}"
        return error
    go_read, go_write = os.pipe()
    helper = os.fork()
    if helper == 0:  # stays in the outer namespace, where it holds CAP_SETUID and CAP_SETGID
        status = 1
        try:
            os.close(go_write)
            if os.read(go_read, 1):
                parent = os.getppid()
                Path(f"/proc/{parent}/uid_map").write_text(f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1")
                Path(f"/proc/{parent}/gid_map").write_text(f"0 0 1\n{SANDBOX_GID} {SANDBOX_GID} 1")
                status = 0
        finally:
            os._exit(status)
    os.close(go_read)
    error = _libc_call(libc, "unshare", CLONE_NEWUSER)
    if error is None:
        os.write(go_write, b"1")
    os.close(go_write)
    _, status = os.waitpid(helper, 0)
    if error is None and os.waitstatus_to_exitcode(status) != 0:
        error = "the helper could not map root and nobody into it"
    return error


def _enter_namespaces(libc: ctypes.CDLL, root: bool, notes: list[str]) -> tuple[bool, bool, bool]:
    """(network, PID, mount) namespaces: root directly; anyone else, or a root without CAP_SYS_ADMIN
    (most containers), inside a new user namespace, which holds the capabilities they need."""
    if not (root and _libc_call(libc, "unshare", CLONE_NEWNET) is None):
        error = _user_namespace(libc, root)
        if error:
            notes.append(f"no user namespace ({error}), hence no network, PID or mount namespace")
            return False, False, False
        if not _unshare(libc, CLONE_NEWNET, "network", notes):
            return False, _unshare(libc, CLONE_NEWPID, "PID", notes), False
    pid_namespace = _unshare(libc, CLONE_NEWPID, "PID", notes)
    return True, pid_namespace, root and _unshare(libc, CLONE_NEWNS, "mount", notes)


def _blocked_ancestor(path: str) -> str | None:
    """The outermost folder on `path` that other users may not enter, if any."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        folder = os.path.join(*parts[:i])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


def _expose(libc: ctypes.CDLL, paths: list[str], notes: list[str]) -> bool:
    """Make `paths` reachable by other users inside our private mount namespace: hide each folder in
    the way under an empty tmpfs (its other contents stay out of sight) and bind the paths back."""
    blocked = {p: b for p in paths if (b := _blocked_ancestor(p))}
    if not blocked:
        return True
    if _libc_call(libc, "mount", None, b"/", None, MS_REC | MS_PRIVATE, None):  # never touch the host's mounts
        notes.append("cannot make the mount namespace private")
        return False
    handles = {p: os.open(p, os.O_PATH) for p in blocked}  # taken before the tmpfs hides them
    os.umask(0o022)  # folders made on the tmpfs must be enterable
    for folder in set(blocked.values()):  # outermost folders: never one inside another
        error = _libc_call(libc, "mount", b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755")
        if error:
            notes.append(f"cannot hide {folder} ({error})")
            return False
    for path, handle in sorted(handles.items()):
        os.makedirs(path, exist_ok=True)
        error = _libc_call(libc, "mount", f"/proc/self/fd/{handle}".encode(), path.encode(), None, MS_BIND | MS_REC, None)
        if error:
            notes.append(f"cannot bind {path} ({error})")
            return False
    return True


def _isolate(libc: ctypes.CDLL, needs: list[str]) -> dict:
    """Take every isolation this machine allows; return what was obtained, and why not the rest."""
    notes: list[str] = []
    subreaper = _libc_call(libc, "prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if subreaper:
        notes.append(f"not a subreaper ({subreaper})")
    uid = os.geteuid()  # before a user namespace, where an unmapped uid would read as 65534
    root = uid == 0
    network, pid_namespace, mount_namespace = _enter_namespaces(libc, root, notes)
    dropped_root = False
    if root:
        if all(_blocked_ancestor(p) is None for p in needs) or mount_namespace and _expose(libc, needs, notes):
            dropped_root = True
        else:
            notes.append("the interpreter or work folder is not reachable by nobody, so the program keeps root")
    return {"uid": SANDBOX_UID if dropped_root else uid, "dropped_root": dropped_root, "network": network,
            "pid_namespace": pid_namespace, "subreaper": subreaper is None, "notes": notes}


def _exec_program(libc: ctypes.CDLL, config: dict, isolation: dict, files: dict, token_fd: int, error_fd: int) -> None:
    """In the forked child: wire stdio, set limits, drop root, exec the interpreter. Never returns."""
    try:
        import resource

        os.dup2(files["stdin"], 0)
        os.dup2(files["stdout"], 1)
        os.dup2(files["stderr"], 2)
        os.chdir(config["workdir"])
        for name, value in config["limits"]:
            kind = getattr(resource, name, None)
            if kind is None:
                continue
            soft, hard = resource.getrlimit(kind)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            try:
                resource.setrlimit(kind, (value, value))
            except (ValueError, OSError):  # a limit this platform does not enforce
                pass
        if isolation["dropped_root"]:
            os.setgroups([])
            os.setgid(SANDBOX_GID)
            os.setuid(SANDBOX_UID)
        _libc_call(libc, "prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        os.set_inheritable(token_fd, True)
        prelude = _PRELUDE % {"token_fd": token_fd, "guard": config["guard"], "program": config["program"]}
        os.execve(config["python"], [config["python"], "-I", "-B", "-c", prelude], config["env"])
    except BaseException as e:  # report through the close-on-exec pipe; the launcher turns it into an error
        os.write(error_fd, f"{type(e).__name__}: {e}".encode())
    finally:
        os._exit(127)


def _children() -> list[int]:
    """Processes whose parent is this one (orphans included: we are their subreaper)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    return found


def _kill_descendants() -> None:
    """Kill children until none is left: each kill reparents the victim's own children to us."""
    deadline = time.monotonic() + SWEEP_SECONDS
    while time.monotonic() < deadline:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def _wait(pid: int, timeout: float) -> tuple[int | None, bool]:
    """Exit code of `pid`, or (None, True) after killing it at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)  # in a PID namespace this ends every process in it
            os.waitpid(pid, 0)
            return None, True
        time.sleep(0.005)


def _launcher_main() -> None:
    config = json.loads(sys.stdin.buffer.read())
    libc = ctypes.CDLL(None, use_errno=True)
    files = {"stdin": os.open(os.devnull, os.O_RDONLY),  # opened before mounts may hide their folders
             "stdout": os.open(config["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
             "stderr": os.open(config["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)}
    os.chmod(os.path.dirname(config["workdir"]), 0o711)  # others may enter the scratch folder, not list it
    isolation = _isolate(libc, config["needs"])
    if isolation["dropped_root"]:  # nobody writes in the work folder and reads its program
        for path in (config["workdir"], os.path.join(config["workdir"], config["program"])):
            os.chown(path, SANDBOX_UID, SANDBOX_GID)
    token_read, token_write = os.pipe()
    os.write(token_write, config["token"].encode())
    os.close(token_write)
    error_read, error_write = os.pipe()  # close-on-exec: empty once the interpreter has started
    pid = os.fork()
    if pid == 0:
        os.close(error_read)
        _exec_program(libc, config, isolation, files, token_read, error_write)
    os.close(error_write)
    os.close(token_read)
    setup_error = os.read(error_read, 4096).decode(errors="replace")
    returncode, timed_out = _wait(pid, config["timeout"])
    _kill_descendants()
    json.dump({"returncode": returncode, "timed_out": timed_out, "isolation": isolation,
               "setup_error": setup_error}, sys.stdout)


if __name__ == "__main__":
    _launcher_main()
