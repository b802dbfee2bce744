"""Shared fixtures and markers.

Fixtures (session-scoped, built once from a slice of the embedded corpus):
  corpus_docs    199 chapters of the World English Bible (every 6th, so all parts of it show up)
  data_dir       Path: shards of corpus_docs, 16 docs per row group, 4 row groups per shard,
                 16 val docs -> 3 train shards (12 row groups) + 1 val shard
  tokenizer_dir  Path: a tokenizer (vocab 512) trained on the train shards and saved there
  tokenizer      that tokenizer, loaded

Markers: `@pytest.mark.slow` runs only with --runslow; `@pytest.mark.gpu` is skipped without CUDA.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from nanochat.corpus import embedded_corpus
from nanochat.dataset import build_shards, list_shards, num_row_groups, read_row_group, split_shards
from nanochat.tokenizer import Tokenizer

TEST_VOCAB_SIZE = 512
REPO = Path(__file__).resolve().parent.parent

# Ray worker processes (and `ray job submit` entrypoints) import this checkout, whatever copy of
# the package pip may have installed elsewhere.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


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
