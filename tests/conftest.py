"""Shared test infrastructure: the checkout's paths, the `clinical-repro` command in an offline environment
(`run_cli`, or in-process: `run_main`), synthetic releases, and the `--campaign` switch for the long campaigns."""
import hashlib, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from clinical_repro.governance import network_guard_env
from clinical_repro.synthetic import write_demo_data

ROOT = Path(__file__).resolve().parents[1]   # the checkout
BIN = Path(sys.executable).parent            # the venv's scripts: clinical-repro, papermill, nbdev-*, jupyter
PARAMS = ROOT / "params"
TEMPLATES = ROOT / "nbs" / "experiments"

# Fault-injection switches act once, on the process they are meant for: never inherited from the caller.
FAULT_SWITCHES = ("CLINICAL_REPRO_CRASH_AT", "CLINICAL_REPRO_CRASH_TAG", "CLINICAL_REPRO_DISK_FULL",
                  "CLINICAL_REPRO_RUNNER_PID")


def cli_env(extra:dict|None=None) -> dict[str, str]:
    "The environment of a `clinical-repro` subprocess: offline, trackers off, one thread, this checkout's params."
    env = {name: value for name, value in os.environ.items() if name not in FAULT_SWITCHES}
    env.update(network_guard_env(offline=True))
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "CLINICAL_REPRO_PARAMS": str(PARAMS), "CLINICAL_REPRO_TEMPLATES": str(TEMPLATES)})
    for name, value in (extra or {}).items():   # a value of None removes the variable
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory):
    """`run_cli(*args, cwd=None, env=None, timeout=900)` runs the console script and returns the CompletedProcess
    (text stdout/stderr). `env` adds to `cli_env()` (None removes a variable); `cwd` defaults to an empty folder."""
    default_cwd = tmp_path_factory.mktemp("cli-cwd")

    def run(*args, cwd=None, env:dict|None=None, timeout:float=900) -> subprocess.CompletedProcess:
        command = [str(BIN / "clinical-repro"), *(str(arg) for arg in args)]
        return subprocess.run(command, capture_output=True, text=True, env=cli_env(env), cwd=cwd or default_cwd,
                              timeout=timeout)
    return run


@pytest.fixture
def run_main(capsys):
    """`run_main(*args)` runs `clinical_repro.cli.main` in this process (no start-up cost) and returns
    (exit code, stdout, stderr); it fails the test when a traceback was printed. The caller's environment applies."""
    from clinical_repro.cli import main

    def run(*args) -> tuple[int, str, str]:
        exit_code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return exit_code, captured.out, captured.err
    return run


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


# --- the long campaigns (crash kills, Ray) run in full only when asked -------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--campaign", action="store_true", default=False,
                     help="run the full crash and Ray campaigns (tests marked `campaign`); also "
                          "CLINICAL_REPRO_FULL_CAMPAIGNS=1. Without it a sample of each runs.")


def full_campaigns(config) -> bool:
    "Whether this session runs the full campaigns: `--campaign` or `CLINICAL_REPRO_FULL_CAMPAIGNS=1`."
    return bool(config.getoption("--campaign")) or os.environ.get("CLINICAL_REPRO_FULL_CAMPAIGNS") == "1"


@pytest.fixture(scope="session")
def full_campaign(request) -> bool:
    "True when the full campaigns were asked for; a test sizes its campaign by it (a sample otherwise)."
    return full_campaigns(request.config)


def pytest_collection_modifyitems(config, items):
    if full_campaigns(config):
        return
    skip = pytest.mark.skip(reason="a full campaign: run with --campaign or CLINICAL_REPRO_FULL_CAMPAIGNS=1")
    for item in items:
        if "campaign" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "campaign: a long campaign (crash kills, Ray), skipped unless --campaign")
    # Under pytest-xdist each worker gets one thread: two workers with two threads each on two cores thrash.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
