"""The Colab notebook (nbs/colab.ipynb) with Colab simulated: Drive is a temporary folder ($CLINICAL_REPRO_DRIVE), the
install cell skips itself because the package is importable. It runs a tiny grid end to end, survives a disconnect
(every process killed after the first unit finished, then the notebook run again: the finished unit is skipped) and
ends with the summary inline; its install cell is generated from pyproject.toml and keeps the installed torch.
The notebook runs a snapshot of the package, params/ and the templates: a unit's identity includes the code's hash,
so a working tree edited during the test (an export) would otherwise rename every unit between the runs."""
import json, os, shutil, subprocess, time, uuid

import nbformat
import pytest

from conftest import BIN, ROOT, cli_env
from crash_harness import kill_tagged
from clinical_repro import colab, config, results

NOTEBOOK = ROOT / "nbs" / "colab.ipynb"
GRID = """
grid: colabtest
data: {dir: null}
tasks: [mednli]
finetune:
  models: [minilm-demo]
  seeds: [0, 1]
  train: {max_steps: 2, eval_steps: 2, effective_batch: 8, learning_rate_grid: null}
"""


def _cells(nb_path) -> list:
    return nbformat.read(str(nb_path), as_version=4).cells


def _outputs(nb_path) -> str:
    "Everything the notebook's reader sees below its cells: streams, displayed text and Markdown, errors."
    out = []
    for cell in _cells(nb_path):
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            out.append(o.get("text", "") + data.get("text/markdown", "") + data.get("text/plain", "")
                       + " ".join(o.get("traceback", [])))
    return "\n".join(out)


def _install_cell() -> str:
    hits = [c.source for c in _cells(NOTEBOOK) if c.cell_type == "code" and "REPOSITORY =" in c.source]
    assert len(hits) == 1, hits
    return hits[0]


def _install_cell_values(monkeypatch, capsys) -> dict:
    "The install cell executed as the tests run it (Colab simulated, the package importable): its variables."
    monkeypatch.setenv(colab.DRIVE_ENV, "/nonexistent-drive")
    values = {}
    parameters, = [c.source for c in _cells(NOTEBOOK) if "parameters" in c.get("metadata", {}).get("tags", [])]
    exec(parameters, values)
    exec(_install_cell(), values)
    assert "nothing installed" in capsys.readouterr().out
    return values


def test_install_cell_and_badge_come_from_pyproject(monkeypatch, capsys):
    url = config.repository_url(ROOT / "pyproject.toml")
    values = _install_cell_values(monkeypatch, capsys)
    assert values["REPOSITORY"] == url
    assert values["revision"] == "main"
    assert values["INSTALL"] == colab.install_commands(url, "main"), "the install cell must run install_commands'"
    assert colab.colab_url(url) in "".join(c.source for c in _cells(NOTEBOOK) if c.cell_type == "markdown")


def test_the_install_keeps_the_installed_torch(tmp_path, monkeypatch, capsys):
    "pip, given the install command's constraint, accepts the torch installed here and refuses to replace it."
    first = _install_cell_values(monkeypatch, capsys)["INSTALL"][0]
    assert colab.KEEP_TORCH in first and "torch" not in first.split(colab.KEEP_TORCH)[1]   # no torch requirement
    import torch
    env = cli_env({"PATH": f"{BIN}:{cli_env()['PATH']}"})

    def dry_run(requirement):
        command = f'python -m pip install --dry-run --no-index {colab.KEEP_TORCH} "{requirement}"'
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
    kept = dry_run("torch>=2.6")
    assert kept.returncode == 0 and "torch>=2.6 in " in kept.stdout and torch.__version__ in kept.stdout, kept.stderr
    other = dry_run(f"torch!={torch.__version__}")
    assert other.returncode != 0 and "torch" in other.stderr


def test_nbdev_test_does_not_execute_the_user_notebook():
    "Its install and Drive cells are for Colab: `nbdev-test` skips it (front matter `skip_exec`), not the module's."
    from nbdev.test import nb_test_cells
    flags = ["slow", "gpu"]
    assert nb_test_cells(NOTEBOOK, flags) == []
    assert len(nb_test_cells(ROOT / "nbs" / "96_colab.ipynb", flags)) > 5
    assert [c for c in _cells(NOTEBOOK) if "parameters" in c.get("metadata", {}).get("tags", [])]


def _snapshot(folder) -> dict:
    "Copy the package, params/ and the templates into `folder`; the environment that makes the notebook use them."
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "clinical_repro", folder / "clinical_repro", ignore=ignore)
    shutil.copytree(ROOT / "params", folder / "params", ignore=ignore)
    shutil.copytree(ROOT / "nbs" / "experiments", folder / "experiments", ignore=ignore)
    python_path = [str(folder), *filter(None, cli_env().get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(python_path), "CLINICAL_REPRO_PARAMS": folder / "params",
            "CLINICAL_REPRO_TEMPLATES": folder / "experiments"}


def _papermill(out_nb, grid_file, cwd, env) -> subprocess.Popen:
    "papermill executing the notebook into `out_nb`, its stderr in `out_nb` with suffix .stderr (a file: never full)."
    command = [str(BIN / "papermill"), str(NOTEBOOK), str(out_nb), "-k", "python3", "--cwd", str(cwd),
               "-p", "grid", str(grid_file), "-p", "data_folder", "data"]
    with open(out_nb.with_suffix(".stderr"), "w") as stderr:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def _finished(grid_folder) -> dict:
    "Results file -> modification time, of the finished units."
    return {p: p.stat().st_mtime_ns for p in sorted((grid_folder / "results").glob("*.json"))
            if results.unit_status(p)[0] in results.FINISHED}


@pytest.fixture(scope="module")
def colab_runs(tmp_path_factory, tiny_release):
    """The notebook killed (every process it started) once the first of two units finished, as a disconnect would;
    then run again to the end; then once more, with nothing left to do."""
    tmp = tmp_path_factory.mktemp("colab")
    drive, cwd = tmp / "drive", tmp / "cwd"
    cwd.mkdir()
    shutil.copytree(tiny_release[0], drive / "clinical_repro" / "data")   # the user copied the releases to Drive
    grid_file = tmp / "colabtest.yaml"
    grid_file.write_text(GRID)
    grid_folder = drive / "clinical_repro" / "reports" / "colabtest"
    tag = uuid.uuid4().hex
    env = cli_env({colab.DRIVE_ENV: drive, "CLINICAL_REPRO_CRASH_TAG": tag, **_snapshot(tmp / "snapshot")})
    first = _papermill(tmp / "first.ipynb", grid_file, cwd, env)
    deadline = time.monotonic() + 900
    while not _finished(grid_folder):
        assert first.poll() is None, ("the notebook ended before a unit finished: "
                                      + (tmp / "first.stderr").read_text()[-3000:])
        assert time.monotonic() < deadline, "no unit finished in 900 s"
        time.sleep(0.2)
    killed = kill_tagged(tag)
    first.wait(timeout=60)
    at_kill = _finished(grid_folder)
    runs = {}
    for name in ("second", "third"):
        started = time.perf_counter()
        process = _papermill(tmp / f"{name}.ipynb", grid_file, cwd, env)
        assert process.wait(timeout=900) == 0, (tmp / f"{name}.stderr").read_text()[-3000:]
        runs[name] = (tmp / f"{name}.ipynb", time.perf_counter() - started)
    return {"drive": drive, "cwd": cwd, "grid_folder": grid_folder, "killed": killed, "at_kill": at_kill,
            "leftover": kill_tagged(tag), **runs}


def test_a_disconnect_after_the_first_unit_resumes_where_it_stopped(colab_runs):
    grid_folder, at_kill = colab_runs["grid_folder"], colab_runs["at_kill"]
    assert colab_runs["killed"] >= 3 and colab_runs["leftover"] == 0   # papermill, its kernel, the unit's kernel
    assert len(at_kill) == 1, f"the kill came after both units had finished: {at_kill}"
    (kept, mtime), = at_kill.items()
    assert kept.stat().st_mtime_ns == mtime                            # the finished unit was not run again
    run_id = kept.stem
    unit_log = (grid_folder / "results" / "logs" / f"{run_id}.log").read_text()
    assert unit_log.count(f"unit {run_id} done") == 1
    second = _outputs(colab_runs["second"][0])
    assert "1 unit(s) finished in an earlier session: skipped if" in second
    run_logs = sorted((grid_folder / "logs").glob("run-*.log"))
    assert "2 units, 1 finished before" in "".join(p.read_text() for p in run_logs)
    manifest = json.loads((grid_folder / "manifest.json").read_text())
    assert [u["status"] for e in manifest["experiments"] for u in e["units"]] == ["ok", "ok"]
    assert len(_finished(grid_folder)) == 2


def test_the_notebook_ends_with_the_summary_and_keeps_everything_on_drive(colab_runs):
    drive, grid_folder = colab_runs["drive"], colab_runs["grid_folder"]
    nb_path, seconds = colab_runs["second"]
    text = _outputs(nb_path)
    assert "Colab simulated ($CLINICAL_REPRO_DRIVE set) and clinical_repro importable: nothing installed" in text
    project = drive / "clinical_repro"
    assert f"HF_HOME={project / 'huggingface'}" in text and f"CLINICAL_REPRO_CACHE={project / 'cache'}" in text
    assert "mednli: ok" in text                                        # check-data on the Drive's data folder
    assert "grid colabtest: 100%" in text                              # the progress bar
    assert "# Summary: colabtest" in text and "Table 3" in text        # the summary, inline
    assert "| predictions |" in text                                   # what the run keeps on Drive
    assert "Traceback" not in text and "exit code" not in text
    assert list((project / "cache" / "models").glob("minilm-demo-*"))   # the demo model was built on Drive
    assert (grid_folder / "summary.html").is_file()
    assert (grid_folder / "mednli" / "minilm-demo__finetune.ipynb").is_file()
    for record in (json.loads(p.read_text()) for p in _finished(grid_folder)):
        assert (grid_folder / "results" / record["items"]).is_file()    # per-item predictions, on Drive
    assert not list(colab_runs["cwd"].iterdir())                        # nothing outside Drive
    use = colab.storage_use(grid_folder, colab.drive_layout(drive))
    print(f"notebook run after the disconnect: {seconds:.0f} s; on Drive: {use}")
    assert use["units"] == 2 and use["predictions"] > 0
    assert not list(grid_folder.glob("results/work/*/checkpoint-*"))   # a finished unit's checkpoints are deleted


def test_running_it_again_after_the_end_runs_nothing(colab_runs):
    text = _outputs(colab_runs["third"][0])
    assert "2 unit(s) finished in an earlier session: skipped if" in text
    assert "(0 executed, 1 skipped: all their units finished)" in text
    assert "summary (unchanged inputs: kept)" in text and "# Summary: colabtest" in text


@pytest.mark.parametrize("path,demo", [("nbs/experiments/experiment.ipynb", True),
                                       ("nbs/experiments/summary.ipynb", False)])
def test_the_templates_install_and_badge_come_from_pyproject(path, demo):
    "The templates' Colab cells use the one repository URL: the install commands and the Open-in-Colab badge."
    url = config.repository_url(ROOT / "pyproject.toml")
    cells = _cells(ROOT / path)
    install = next(c.source for c in cells if c.cell_type == "code" and "INSTALL = " in c.source)
    values = {}
    exec(install.split("if \"google.colab\"")[0], values)
    assert values["INSTALL"] == colab.install_commands(url, demo=demo)
    badges = "".join(c.source for c in cells if c.cell_type == "markdown")
    assert f"({colab.colab_url(url, path)})" in badges
