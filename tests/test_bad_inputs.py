"""Bad inputs end to end: each gives a clear message and leaves the rest of the grid intact.
(A model that fails to load: tests/test_runner.py; a killed run: tests/test_crash.py.)

One grid run meets three of them at once, as a user's run may: a task folder is missing, the disk fills up while one
unit writes its results, and then a results file is found cut off mid-write. A rerun repairs what can be repaired."""
import json, shutil, subprocess
from pathlib import Path

import pytest

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
  seeds: [{seeds}]
  train: {{max_steps: 2, eval_steps: 2, effective_batch: 8}}
"""


def grid_file(tmp_path, data, tasks="mednli, radqa", seeds="0") -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(GRID.format(data=data, tasks=tasks, seeds=seeds))
    return p


def results_by_seed(gdir, task) -> dict:
    found = [json.loads(p.read_text()) for p in (gdir / "results").glob("*.json")]
    return {r["seed"]: r for r in found if r["task"] == task}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_release, run_cli):
    """MedNLI (seeds 0 and 1) and RadQA, RadQA's folder missing, the disk full when MedNLI seed 0 writes its results;
    then seed 1's results file cut off mid-write, a dry run, and a rerun with the space freed."""
    tmp = tmp_path_factory.mktemp("bad")
    data = tmp / "data"
    shutil.copytree(tiny_release[0], data)
    shutil.rmtree(data / "radqa")
    g = grid_file(tmp, data, seeds="0, 1")
    reports = tmp / "reports"
    gdir = reports / "bad"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLINICAL_REPRO_PARAMS", str(PARAMS))
        states = dict((e.task, s) for e, s in plan_grid(load_grid(g), data, reports))
    run_ids = {state.unit["seed"]: state.run_id for state in states["mednli"]}
    full = run_cli("run", g, "--reports", reports, "--no-summary",
                   env={"CLINICAL_REPRO_DISK_FULL": f"write:{run_ids[0]}.json"})
    after_full = {"failures": json.loads((gdir / "failures.json").read_text()),
                  "results": results_by_seed(gdir, "mednli"), "temporaries": list(gdir.rglob(".*.tmp"))}
    cut = gdir / "results" / f"{run_ids[1]}.json"
    cut.write_text('{"run_id": "' + run_ids[1] + '", "status": "ok", "metr')   # cut off mid-write
    dry = run_cli("run", g, "--reports", reports, "--dry-run")
    rerun = run_cli("run", g, "--reports", reports, "--no-summary")
    return dict(data=data, gdir=gdir, run_ids=run_ids, full=full, after_full=after_full, cut=cut, dry=dry,
                rerun=rerun, after_rerun=results_by_seed(gdir, "mednli"))


def test_missing_task_folder_fails_its_units_only(bad_run):
    assert bad_run["full"].returncode == 1
    radqa = [f for f in bad_run["after_full"]["failures"] if f["task"] == "radqa"]
    assert len(radqa) == 2   # both seeds
    assert all(get_task("radqa").physionet_page in f["error"] and str(bad_run["data"]) in f["error"] for f in radqa)
    assert bad_run["after_full"]["results"][1]["status"] == "ok"
    assert bad_run["rerun"].returncode == 1   # still missing: still failing, and only it
    failures = json.loads((bad_run["gdir"] / "failures.json").read_text())
    assert [f["task"] for f in failures] == ["radqa", "radqa"]


def test_full_disk_fails_one_unit_cleanly_and_the_rest_completes(bad_run):
    mednli = [f for f in bad_run["after_full"]["failures"] if f["task"] == "mednli"]
    assert [f["run_id"] for f in mednli] == [bad_run["run_ids"][0]], mednli
    assert "No space left on device" in mednli[0]["error"]
    assert 0 not in bad_run["after_full"]["results"] and not bad_run["after_full"]["temporaries"]
    assert bad_run["after_full"]["results"][1]["status"] == "ok"   # the unit after it, in the same notebook
    assert bad_run["after_rerun"][0]["status"] == "ok"               # space freed: it completes


def test_corrupt_results_file_is_run_again(bad_run):
    dry = bad_run["dry"].stdout
    assert "is corrupt" in dry and str(bad_run["cut"]) in dry and "would run 4 of 4 units" in dry, dry
    good, again = bad_run["after_full"]["results"][1], bad_run["after_rerun"][1]
    assert again["status"] == "ok" and again["metrics"] == good["metrics"]


def test_malformed_grid_yaml_names_file_and_line_and_writes_nothing(tmp_path, tiny_release, run_cli):
    g = grid_file(tmp_path, tiny_release[0])
    g.write_text(g.read_text().replace("seeds: [0]", "seeds: [0"))
    r = run_cli("run", g, "--reports", tmp_path / "reports")
    assert r.returncode == 2 and str(g) in r.stderr and "line" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "reports").exists()


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
