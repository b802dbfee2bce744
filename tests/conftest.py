"""Shared fixtures and markers.

Fixtures (session-scoped, built once from a slice of the embedded corpus):
  corpus_docs    199 chapters of the World English Bible (every 6th, so all parts of it show up)
  data_dir       Path: shards of corpus_docs, 16 docs per row group, 4 row groups per shard,
                 16 val docs -> 3 train shards (12 row groups) + 1 val shard
  tokenizer_dir  Path: a tokenizer (vocab 512) trained on the train shards and saved there
  tokenizer      that tokenizer, loaded
  local_ray      a local Ray instance shared by the modules that ask for it (see below); its Serve replicas
                 listen on SERVE_PORTS themselves (direct ingress), its proxy on the port serve.start names
  tracking_server  (URI, folder): an MLflow tracking server on 127.0.0.1, as cluster/mlflow_server.sh starts it

Markers: `@pytest.mark.slow` runs only with --runslow; `@pytest.mark.gpu` is skipped without CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nanochat.common import free_port, stop_process_group
from nanochat.corpus import embedded_corpus
from nanochat.dataset import build_shards, list_shards, num_row_groups, read_row_group, split_shards
from nanochat.tokenizer import Tokenizer

TEST_VOCAB_SIZE = 512
REPO = Path(__file__).resolve().parent.parent

# Ray worker processes (and `ray job submit` entrypoints) import this checkout, whatever copy of
# the package pip may have installed elsewhere.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def run_fresh(code: str, env: dict[str, str]) -> None:
    """Run `code` in a fresh Python with `env` added (TRITON_INTERPRET is read when Triton kernels are
    defined, so a kernel test under the interpreter needs its own process); it must print "ok" last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if uses_shared_ray(item):
            SHARED_RAY_MODULES.add(item.module.__name__)


# --- one local Ray instance for the whole session -------------------------------------------------
# Starting Ray costs 5-20 s on a 2-core machine, so the instance `local_ray` starts stays up until
# the session ends, for every later module that asks for it. Ray allows one instance per process:
# before a test of a module that imports ray but does not ask for `local_ray` (it starts a cluster
# of its own), the shared one is shut down, to be started again by the next module that asks.

RAY_CPUS = 8  # logical CPUs: the most any module asks of it (a Tune trial and its data actors, Serve's replicas)
SHARED_RAY_MODULES: set[str] = set()  # modules with a test that asks for the shared instance


METRICS_PORT = free_port()  # the shared instance's Prometheus endpoint: http://127.0.0.1:METRICS_PORT/metrics
# the ports its Serve replicas may listen on (direct ingress; a port in use is skipped)
_first_serve_port = free_port()
SERVE_PORTS = range(_first_serve_port, _first_serve_port + 8)


@pytest.fixture(scope="session")
def serve_ports() -> range:
    """SERVE_PORTS of the conftest that started local_ray (a module importing tests.conftest may get another copy)."""
    return SERVE_PORTS


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port of local_ray's Prometheus endpoint (a fixture: tests that import this module get a copy of it)."""
    return METRICS_PORT
_shared_ray_running = False


def uses_shared_ray(item: pytest.Item) -> bool:
    """The test asks for this file's `local_ray`, not for a fixture of that name in its own module."""
    module = getattr(item, "module", None)
    return "local_ray" in getattr(item, "fixturenames", ()) and module is not None and not hasattr(module, "local_ray")


@pytest.fixture(scope="module")
def local_ray() -> None:
    global _shared_ray_running
    import ray

    from ray_jobs.serve import direct_ingress_env

    if not ray.is_initialized():
        # Serve's ingress replicas listen on SERVE_PORTS themselves, as `python -m ray_jobs.serve` runs one
        # replica: Ray's processes inherit the environment they start with (this process's stays as it was)
        with pytest.MonkeyPatch.context() as env:
            for name, value in direct_ingress_env(SERVE_PORTS.start, len(SERVE_PORTS)).items():
                env.setenv(name, value)
            # address="local": an instance of our own, never a cluster that happens to run on this host
            ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, _metrics_export_port=METRICS_PORT)
        _shared_ray_running = True


def stop_shared_ray() -> None:
    global _shared_ray_running
    ray = sys.modules.get("ray")
    if _shared_ray_running and ray is not None and ray.is_initialized():
        ray.shutdown()
    _shared_ray_running = False


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, which may start a Ray of their own
def pytest_runtest_setup(item):
    module = getattr(item, "module", None)
    ray = sys.modules.get("ray")
    if ray is not None and module is not None and vars(module).get("ray") is ray and module.__name__ not in SHARED_RAY_MODULES:
        stop_shared_ray()


def pytest_sessionfinish(session, exitstatus):
    stop_shared_ray()


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return list(itertools.islice(embedded_corpus(), 0, 1200, 6))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_docs) -> Path:
    out = tmp_path_factory.mktemp("nanochat_data")
    build_shards(corpus_docs, out, docs_per_row_group=16, row_groups_per_shard=4, val_docs=16)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("nanochat_tokenizer")
    train_shards = split_shards(list_shards(data_dir), "train")
    texts = (
        doc
        for shard in train_shards
        for g in range(num_row_groups(shard))
        for doc in read_row_group(shard, g)
    )
    Tokenizer.train(texts, TEST_VOCAB_SIZE).save(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, headless, driven by selenium; the test is skipped when either is missing
    (apt-get install -y chromium chromium-driver && pip install selenium). A browser that downloads
    itself would not work on machines without network."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,760", "--lang=en-US", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A real MLflow tracking server on 127.0.0.1 at a free port, started as the cluster files start it
    (cluster/mlflow_server.sh) with its store and artifacts in a folder of its own: (its URI, that folder),
    once /health answers; one for the session. Stopped with its workers (its own process group) at the end."""
    folder, port = tmp_path_factory.mktemp("mlflow_server"), free_port()
    log, uri = folder / "server.log", f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([REPO / "cluster" / "mlflow_server.sh", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"], env={**os.environ, "NANOCHAT_MLFLOW_DIR": str(folder), "PYTHON": sys.executable},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # imports and the store's schema: ~15 s on an idle 2-core machine
        while True:
            with contextlib.suppress(OSError):  # not listening yet, or listening but not answering yet
                urllib.request.urlopen(f"{uri}/health", timeout=5).close()
                break
            tail = "\n".join(log.read_text().splitlines()[-30:])
            assert server.poll() is None, f"mlflow server exited with {server.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"mlflow server not healthy after 180 s:\n{tail}"
            time.sleep(0.5)
        yield uri, folder
    finally:
        stop_process_group(server, grace_s=30)
