"""Shared fixtures: synthetic releases written fresh for each test that mutates them."""
import hashlib, os, shutil
from pathlib import Path

import pytest

from clinical_repro.synthetic import write_demo_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    "The tiny synthetic releases and what the generator says it wrote (read-only: copy before mutating)."
    d = tmp_path_factory.mktemp("tiny")
    written = write_demo_data(d, seed=11, size="tiny")
    return d, written


@pytest.fixture
def release(tiny_release, tmp_path):
    "A private, mutable copy of the tiny releases."
    src, written = tiny_release
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def tree_state(root) -> dict:
    "Path -> sha256 of every file under `root`: to show a command wrote nothing."
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def find(root, name) -> Path:
    "The one file called `name` under `root`."
    hits = list(Path(root).rglob(name))
    assert len(hits) == 1, hits
    return hits[0]


def pytest_configure(config):
    "Under pytest-xdist each worker gets one thread: two workers with two threads each on two cores thrash."
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
