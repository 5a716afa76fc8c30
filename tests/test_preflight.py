"""`run GRID --dry-run` checks every model and every task's data before any unit runs, and lists what would fail with
what to do about it (the preflight); nothing is downloaded, built or run."""
import json, shutil
from pathlib import Path

import pytest

from clinical_repro.data import load_task
from clinical_repro.grid import grid_path, load_grid
from clinical_repro.runner import preflight, preflight_failures, run_grid
from clinical_repro.tasks import get_task

GRID = """
grid: pre
data: {{dir: {data}}}
tasks: [mednli, radqa]
finetune: {{models: [minilm-demo, roberta-base, clinical-t5-base], seeds: [0]}}
icl: {{models: [t5-tiny-demo], shots: [0], limit: 4, dev_n: 4}}
"""
# The hub at a closed port: unreachable, deterministically, with no network needed.
ONLINE_UNREACHABLE = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture
def mednli_only(tiny_release, tmp_path) -> Path:
    "A data folder holding MedNLI only (RadQA missing)."
    data = tmp_path / "data"
    shutil.copytree(tiny_release[0] / "mednli", data / "mednli")
    return data


@pytest.fixture
def grid_file(mednli_only, tmp_path) -> Path:
    path = tmp_path / "pre.yaml"
    path.write_text(GRID.format(data=mednli_only))
    return path


def preflight_lines(stdout: str) -> list[str]:
    "The preflight table and its verdict, as printed last by a dry run."
    lines = stdout.splitlines()
    return lines[lines.index("preflight (each model can load here, each task's data is there and valid):"):]


def test_dry_run_lists_each_model_and_task_with_what_to_do(grid_file, mednli_only, tmp_path, run_cli):
    "Offline: the uncached hub model, the local model whose folder is not set and the missing task are listed."
    r = run_cli("run", grid_file, "--reports", tmp_path / "reports", "--dry-run", env={"CLINICAL_T5_BASE": None})
    table = preflight_lines(r.stdout)
    assert [line.split(":")[0] for line in table[1:-1]] == [
        "  ok    model minilm-demo", "  FAIL  model roberta-base", "  FAIL  model clinical-t5-base",
        "  ok    model t5-tiny-demo", "  ok    task mednli", "  FAIL  task radqa"], r.stdout + r.stderr
    roberta, clinical_t5, radqa = table[2], table[3], table[6]
    assert "config.json is not in the Hugging Face cache" in roberta and "set HF_HUB_OFFLINE=1" in roberta
    assert "replace `hub_id: roberta-base` of roberta-base by `local_path: /path/to/the/folder`" in roberta
    assert "Set CLINICAL_T5_BASE to the folder holding config.json" in clinical_t5
    assert f"radqa: no release found in {mednli_only / 'radqa'}" in radqa and get_task("radqa").physionet_page in radqa
    mednli = load_task(mednli_only, "mednli").splits
    assert table[5] == (f"  ok    task mednli: {mednli_only / 'mednli'}: train {len(mednli['train'])}, "
                        f"dev {len(mednli['dev'])}, test {len(mednli['test'])} items")
    assert table[-1] == ("preflight: 3 of 6 checks would fail (model roberta-base, model clinical-t5-base, "
                         "task radqa): fix them before running")
    # each unit failing for one of these points at the preflight instead of repeating the remedy
    assert any(line.startswith("      seed 0, fraction 1: failed (~") and
               line.endswith(" - task radqa would fail (see the preflight)") for line in r.stdout.splitlines())
    assert r.stdout.count("set HF_HUB_OFFLINE=1") == 1
    assert not [p for p in (tmp_path / "reports").rglob("*") if p.suffix == ".ipynb" or p.name == "manifest.json"]


def test_unreachable_hub_is_listed_without_waiting_for_retries(grid_file, tmp_path, run_cli):
    "Online, hub unreachable, model not cached: one FAIL row saying so, with both remedies."
    env = {**ONLINE_UNREACHABLE, "HF_HUB_CACHE": tmp_path / "empty-cache", "CLINICAL_T5_BASE": None}
    r = run_cli("run", grid_file, "--reports", tmp_path / "reports", "--dry-run", env=env)
    roberta = next(line for line in preflight_lines(r.stdout) if "model roberta-base" in line)
    assert roberta.startswith("  FAIL  model roberta-base: hub id roberta-base is not in the Hugging Face cache and "
                              "the hub at http://127.0.0.1:9 cannot be reached"), r.stdout + r.stderr
    assert "set HF_HUB_OFFLINE=1" in roberta and "`local_path: /path/to/the/folder`" in roberta


def test_invalid_release_shows_its_first_errors(grid_file, mednli_only):
    "A release check-data refuses: the row says so, with its first errors and the command that lists them all."
    train = next((mednli_only / "mednli").rglob("mli_train_v1.jsonl"))
    train.write_text(train.read_text().replace('"gold_label": "neutral"', '"gold_label": "maybe"'))
    rows = {row["name"]: row for row in preflight(load_grid(grid_file), mednli_only)}
    assert rows["mednli"]["status"] == "fail"
    assert rows["mednli"]["detail"].startswith("invalid release: ") and "'maybe'" in rows["mednli"]["detail"]
    assert rows["mednli"]["detail"].endswith(f"; see clinical-repro check-data --data-dir {mednli_only}")


def test_dry_run_result_carries_the_preflight_rows(grid_file, mednli_only, tmp_path, monkeypatch):
    "The dry run's result (what `--json` prints) has the rows; `preflight_failures` is what would fail."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLINICAL_T5_BASE", raising=False)
    dry = run_grid(grid_file, reports=tmp_path / "reports", dry_run=True, out=lambda line: None)
    rows = dry["preflight"]
    assert rows == preflight(load_grid(grid_file), mednli_only)
    assert json.loads(json.dumps(rows)) == rows   # plain JSON
    assert [(row["kind"], row["name"]) for row in preflight_failures(rows)] == [
        ("model", "roberta-base"), ("model", "clinical-t5-base"), ("task", "radqa")]
    assert all(set(row) == {"kind", "name", "status", "detail"} for row in rows)
    assert not (tmp_path / "reports").exists()   # a dry run writes nothing (not even the fraction subsets)


def test_demo_grid_passes_before_its_data_is_written(tmp_path):
    "The demo: demo models (checked, not built) and synthetic data still to be written: nothing would fail."
    rows = preflight(load_grid(grid_path("demo")), tmp_path / "not-written-yet")
    assert preflight_failures(rows) == []
    assert [row["name"] for row in rows] == ["minilm-demo", "minilm-random-demo", "smollm2-demo",
                                             "mednli", "radqa", "clip"]
    assert all(row["detail"].startswith("demo model") for row in rows[:3])
    assert rows[3]["detail"] == f"synthetic demo data, written to {tmp_path / 'not-written-yet'} before the first unit"
    assert not (tmp_path / "not-written-yet").exists()


def test_llm_grid_dry_run_lists_pairs_licences_backend_and_gpu_time(tmp_path, run_cli):
    "`run llm-icl --dry-run --json --gpu h100`: the matched pairs, each model's hub id, licence and backend, the time."
    (tmp_path / "data").mkdir()
    r = run_cli("run", "llm-icl", "--dry-run", "--json", "--gpu", "h100", "--data-dir", tmp_path / "data",
                "--reports", tmp_path / "reports", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r.stderr[-2000:]   # here: no model cached and no release, so the preflight fails
    plan = json.loads(r.stdout)
    assert [(p["medical"], p["general"]) for p in plan["pairs"]] == [
        ("biomistral-7b", "mistral-7b-instruct-v0-1"), ("medgemma-4b-it", "gemma-3-4b-it"),
        ("medgemma-27b-text-it", "gemma-3-27b-it"), ("meditron-7b", "llama-2-7b")]
    biomistral, llama = plan["models"]["biomistral-7b"], plan["models"]["llama-3-3-70b-instruct"]
    assert biomistral["hub_id"] == "BioMistral/BioMistral-7B" and biomistral["licence"] == "apache-2.0"
    assert biomistral["backend"] == "transformers" and biomistral["base"] == "mistral-7b-instruct-v0-1"
    assert llama["licence"] == "llama3.3" and "Llama 3.3 Community License" in llama["access"]
    assert "medical/health" in llama["use_restriction"]
    assert plan["estimate"]["device"] == "NVIDIA H100" and len(plan["units"]) == 231
    seconds = {(u["task"], u["model"], u["shots"], u["draw"]): u["estimate"]["total_s"] for u in plan["units"]}
    assert all(s > 0 for s in seconds.values())
    assert seconds["mednli", "llama-3-3-70b-instruct", 3, 0] > 5 * seconds["mednli", "llama-3-1-8b-instruct", 3, 0]
    assert {row["name"] for row in preflight_failures(plan["preflight"])} >= {"biomistral-7b", "mednli"}
