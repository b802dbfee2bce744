"""ray_jobs.bench_endpoint on CPU with the tiny checkpoint: the engine and the served decode path, then
`python -m ray_jobs.serve` as a user starts it (its own Ray; one replica, which listens on the port
itself) under the plain-HTTP and the openai clients, reported side by side."""

from __future__ import annotations

import re

import pytest

from nanochat.errors import UsageError
from ray_jobs import bench_endpoint
from ray_jobs.serve import check_port
from tests.test_chat_eval import tiny_run  # noqa: F401  (the shared tiny checkpoint fixture)


def test_the_endpoint_is_measured_beside_the_engine(tiny_run, capsys):  # noqa: F811
    result = bench_endpoint.main(["--checkpoint", str(tiny_run), "--device", "cpu", "--streams", "1,3",
                                  "--requests-per-stream", "2", "--max-tokens", "6", "--repeats", "1"])
    assert result["server"].startswith(f"serving {tiny_run}") and "(the replica itself;" in result["server"]
    assert result["server_exit_status"] == 0  # SIGTERM: Serve shut down, the command exited cleanly
    check_port("127.0.0.1", int(re.search(r"http://127\.0\.0\.1:(\d+)/", result["server"]).group(1)))  # freed
    assert [(r["client"], r["concurrency"], r["requests"]) for r in result["endpoint"]] == [
        ("http", 1, 2), ("http", 3, 6), ("openai", 1, 2), ("openai", 3, 6)]
    assert all(r["completed"] == r["requests"] and r["completion_tokens"] > 0 for r in result["endpoint"])
    assert [r["rows"] for r in result["engine"]["serve_path"]["results"]] == [1, 3]
    for row in result["summary"]:
        assert row["share_of_engine"] == row["tokens_per_s"] / row["engine_tokens_per_s"] > 0
        assert (row["stream_share_of_one_row"] is not None) == (row["streams"] == 1), row
    out = capsys.readouterr().out
    assert "endpoint beside the engine" in out and "% of the engine's" in out


def test_a_bad_client_list_is_refused_before_anything_runs(tiny_run):  # noqa: F811
    with pytest.raises(UsageError, match="--clients 'grpc'"):
        bench_endpoint.main(["--checkpoint", str(tiny_run), "--clients", "grpc"])
