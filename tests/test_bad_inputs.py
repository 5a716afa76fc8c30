"""Bad inputs end to end: each gives a clear message and leaves the rest of the grid intact.
(A model that fails to load: tests/test_runner.py; a killed run: tests/test_crash.py.)"""
import json, shutil, subprocess
from pathlib import Path

from clinical_repro.grid import load_grid
from clinical_repro.runner import plan_grid
from clinical_repro.tasks import get_task
from conftest import PARAMS


GRID = """
grid: bad
data: {{dir: {data}}}
tasks: [{tasks}]
finetune:
  models: [minilm-demo]
  seeds: [0]
  train: {{max_steps: 2, eval_steps: 2, effective_batch: 8}}
"""


def grid_file(tmp_path, data, tasks="mednli, radqa") -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(GRID.format(data=data, tasks=tasks))
    return p


def results(gdir) -> dict:
    return {json.loads(p.read_text())["task"]: json.loads(p.read_text()) for p in (gdir / "results").glob("*.json")}


def test_malformed_grid_yaml_names_file_and_line_and_writes_nothing(tmp_path, tiny_release, run_cli):
    g = grid_file(tmp_path, tiny_release[0])
    g.write_text(g.read_text().replace("seeds: [0]", "seeds: [0"))
    r = run_cli("run", g, "--reports", tmp_path / "reports")
    assert r.returncode == 2 and str(g) in r.stderr and "line" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "reports").exists()


def test_missing_task_folder_fails_its_units_only(tmp_path, release, run_cli):
    shutil.rmtree(release / "radqa")
    g = grid_file(tmp_path, release)
    r = run_cli("run", g, "--reports", tmp_path / "reports", "--no-summary")
    assert r.returncode == 1
    gdir = tmp_path / "reports" / "bad"
    fails = json.loads((gdir / "failures.json").read_text())
    assert [f["task"] for f in fails] == ["radqa"]
    assert get_task("radqa").physionet_page in fails[0]["error"] and str(release) in fails[0]["error"]
    assert results(gdir)["mednli"]["status"] == "ok"


def test_corrupt_results_file_is_run_again(tmp_path, tiny_release, run_cli):
    g = grid_file(tmp_path, tiny_release[0], tasks="mednli")
    reports = tmp_path / "reports"
    assert run_cli("run", g, "--reports", reports, "--no-summary").returncode == 0
    res = next((reports / "bad" / "results").glob("*.json"))
    good = json.loads(res.read_text())
    res.write_text('{"run_id": "' + good["run_id"] + '", "status": "ok", "metr')   # cut off mid-write
    dry = run_cli("run", g, "--reports", reports, "--dry-run")
    assert "is corrupt" in dry.stdout and str(res) in dry.stdout and "would run 1 of 1 units" in dry.stdout
    r = run_cli("run", g, "--reports", reports, "--no-summary")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(res.read_text())
    assert again["status"] == "ok" and again["metrics"] == good["metrics"]


def test_full_disk_fails_one_unit_cleanly_and_the_rest_completes(tmp_path, tiny_release, run_cli, monkeypatch):
    g = grid_file(tmp_path, tiny_release[0])
    reports = tmp_path / "reports"
    plan = run_cli("run", g, "--reports", reports, "--dry-run")
    assert plan.returncode == 0
    # the run_id of the MedNLI unit: its results file is the write that finds the disk full
    monkeypatch.setenv("CLINICAL_REPRO_PARAMS", str(PARAMS))
    states = dict((e.task, s) for e, s in plan_grid(load_grid(g), tiny_release[0], reports))
    rid = states["mednli"][0].run_id
    r = run_cli("run", g, "--reports", reports, "--no-summary", env={"CLINICAL_REPRO_DISK_FULL": f"write:{rid}.json"})
    assert r.returncode == 1
    gdir = reports / "bad"
    fails = json.loads((gdir / "failures.json").read_text())
    assert [f["task"] for f in fails] == ["mednli"] and "No space left on device" in fails[0]["error"], fails
    assert not (gdir / "results" / f"{rid}.json").exists() and not list(gdir.rglob(".*.tmp"))
    assert results(gdir)["radqa"]["status"] == "ok"
    r = run_cli("run", g, "--reports", reports, "--no-summary")   # space freed: it completes
    assert r.returncode == 0 and json.loads((gdir / "results" / f"{rid}.json").read_text())["status"] == "ok"


def test_data_inside_a_git_work_tree_is_refused(tmp_path, tiny_release, run_cli):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_release[0], repo / "data")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    g = grid_file(tmp_path, repo / "data", tasks="mednli")
    r = run_cli("run", g, "--reports", tmp_path / "reports")
    assert r.returncode == 2 and str(repo / "data") in r.stderr and ".gitignore" in r.stderr
    assert not (tmp_path / "reports").exists()
    (repo / "data" / "SYNTHETIC_DEMO_DATA.json").unlink()   # as real releases: single units are guarded too
    r = run_cli("finetune", "--task", "mednli", "--model", "minilm-demo", "--data-dir", repo / "data",
                "--out", tmp_path / "units")
    assert r.returncode == 2 and "not git-ignored" in r.stderr and not (tmp_path / "units").exists()
    (repo / ".gitignore").write_text("data/\n")
    r = run_cli("run", g, "--reports", tmp_path / "reports", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
