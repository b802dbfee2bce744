"""nanochat.execution: model-written code runs in a separate, isolated, limited interpreter and fails cleanly.

The escape tests assert the strongest guarantee this machine gives (`result.isolation`, probed at run time):
where the kernel refuses a namespace only that assertion is skipped, with the reason."""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from nanochat.execution import SANDBOX_UID, TRUNCATED, run_python
from nanochat.tasks.humaneval import HumanEval


def test_passing_code_passes_and_its_output_comes_back():
    result = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok', add(1, 1))")
    assert result.passed and not result.timed_out
    assert result.stdout == "ok 2\n" and result.stderr == ""


def test_failing_assert_fails_with_the_programs_own_traceback():
    result = run_python("x = 1\nassert x == 2, 'x is wrong'")
    assert not result.passed and not result.timed_out
    assert "AssertionError: x is wrong" in result.stderr
    assert 'File "program.py", line 2' in result.stderr  # line numbers of the program, not of the prelude


def test_nonzero_exit_fails():
    assert not run_python("import sys\nsys.exit(3)").passed
    result = run_python("print('checked')")
    assert result.passed and result.returncode == 0 and result.stdout == "checked\n"  # the token line is taken off


@pytest.mark.parametrize("exit_early", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit",
                                        "import posix; posix._exit(0)"])
def test_an_exit_before_the_checks_fails_even_with_status_zero(exit_early):
    result = run_python(f"def add(a, b):\n    return a - b\n\n{exit_early}\nassert add(2, 3) == 5\n")
    assert result.returncode == 0 and not result.passed and not result.timed_out
    assert "Traceback" not in result.stderr  # it did leave early: the failing assert never ran


def test_humaneval_grades_a_correct_answer_right_and_an_early_exit_wrong():
    task = HumanEval()
    conversation = task.get(0)
    doc = task.by_id[conversation["task_id"]]
    assert task.evaluate(conversation, doc["canonical_solution"])
    assert not task.evaluate(conversation, "    return True\nimport sys\nsys.exit(0)\n")
    assert not task.evaluate(conversation, "    return True\nimport os\nos._exit(0)\n")


def test_infinite_loop_times_out_and_is_killed():
    start = time.perf_counter()
    result = run_python("while True:\n    pass", timeout=1.0)
    assert result.timed_out and not result.passed
    assert time.perf_counter() - start < 8  # two interpreters start: the launcher and the program


def test_reading_stdin_fails_instead_of_waiting():
    result = run_python("name = input()\nprint(name)", timeout=5.0)
    assert not result.passed and not result.timed_out
    assert "EOFError" in result.stderr


def test_huge_allocation_fails_cleanly():
    result = run_python("blob = bytearray(64 * 1024**3)")
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


def test_output_is_truncated():
    result = run_python("print('x' * 1_000_000)", max_output=1000)
    assert result.passed
    assert result.stdout.endswith(TRUNCATED) and len(result.stdout) == 1000 + len(TRUNCATED)


def test_runs_in_a_fresh_directory_with_a_minimal_environment(tmp_path):
    result = run_python("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(sorted(os.environ))")
    assert result.passed
    cwd, env = result.stdout.splitlines()
    assert cwd != os.getcwd() and not os.path.exists(cwd), "the working directory must be temporary and removed"
    assert "PYTHONPATH" not in env and "HOME" in env


def test_destructive_calls_are_refused_and_can_be_allowed(tmp_path):
    victim = tmp_path / "keep"
    victim.mkdir()
    result = run_python(f"import shutil\nshutil.rmtree({str(victim)!r})")
    assert not result.passed and "PermissionError" in result.stderr and victim.exists()
    result = run_python("import subprocess\nsubprocess.run(['true'])")
    assert not result.passed and "disabled" in result.stderr
    assert run_python("import subprocess\nsubprocess.run(['true'], check=True)", guard=False).passed


@pytest.fixture
def open_folder():
    """A folder any user may write, as the sandbox user may (pytest's tmp_path is private to us)."""
    folder = tempfile.mkdtemp(prefix="nanochat-test-")
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder)


def test_posix_system_escape_is_refused_and_graded_wrong(open_folder):
    marker = Path(open_folder) / "escaped"
    result = run_python(f"import posix\nposix.system('touch {marker}')\n")
    assert not result.passed and "posix.system is disabled" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_a_descendant_that_calls_setsid_dies_with_the_run(ending, open_folder):
    marker = os.path.join(open_folder, "outlived")
    program = (f"import os, time\n"
               f"if os.fork() == 0:\n"
               f"    os.setsid()  # leaves the process group\n"
               f"    if os.fork() == 0:  # and its parent: reparented, a daemon\n"
               f"        time.sleep(2.0)\n"
               f"        open({marker!r}, 'w').write('still alive')\n"
               f"    os._exit(0)\n"
               f"{'while True: pass' if ending == 'times out' else 'print(1)'}\n")
    result = run_python(program, timeout=1.0 if ending == "times out" else 10.0, guard=False)
    assert result.passed == (ending == "exits") and result.timed_out == (ending == "times out"), result
    assert result.isolation.pid_namespace or result.isolation.subreaper, result.isolation.statement()
    deadline = time.time() + 2.5
    while time.time() < deadline:
        assert not os.path.exists(marker), "a descendant of the program outlived the run"
        time.sleep(0.05)


def test_the_network_is_cut_off():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n"
                            f"print('connected')\n")
        if not result.isolation.network:  # the statement must then own up to it, and the connection works
            assert result.passed and "WITH the network" in result.isolation.statement()
            pytest.skip(f"no network namespace on this machine: {result.isolation.statement()}")
        assert not result.passed and "connected" not in result.stdout
        assert "OSError" in result.stderr or "unreachable" in result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the listener
        assert "no network" in result.isolation.statement()


def test_runs_as_an_unprivileged_user_when_root(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    result = run_python(f"import os\nprint(os.getuid(), os.geteuid(), os.getgroups())\n"
                        f"print(open({str(secret)!r}).read())\n")
    uid, euid, groups = result.stdout.splitlines()[0].split(" ", 2)
    if os.geteuid() != 0:  # it runs as the current user, and says so
        assert int(uid) == os.getuid() and "current user" in result.isolation.statement()
        return
    if not result.isolation.dropped_root:
        assert "AS ROOT" in result.isolation.statement()
        pytest.skip(f"the sandbox cannot leave root here: {result.isolation.statement()}")
    assert int(uid) == int(euid) == SANDBOX_UID and groups == "[]" and result.isolation.uid == SANDBOX_UID
    assert not result.passed and "PermissionError" in result.stderr  # root's files are out of reach
