"""nanochat.execution: model-written code runs in a separate, limited interpreter and fails cleanly."""

import os
import time

import pytest

from nanochat.execution import TRUNCATED, run_python


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
    assert run_python("import sys\nsys.exit(0)").passed


def test_infinite_loop_times_out_and_is_killed():
    start = time.perf_counter()
    result = run_python("while True:\n    pass", timeout=1.0)
    assert result.timed_out and not result.passed
    assert time.perf_counter() - start < 5


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


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_processes_left_behind_are_killed():
    result = run_python("import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                        "print(p.pid)", guard=False)
    assert result.passed
    pid = int(result.stdout)
    deadline = time.time() + 5
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
