"""The grid runner end to end: papermill notebooks per experiment, skip/resume, failures kept apart, the summary."""
import json, subprocess

import nbformat
import pytest

from conftest import BIN, TEMPLATES, cli_env, no_ray_cluster, results_by_file

TEMPLATE = TEMPLATES / "experiment.ipynb"
NO_T5_BASE = {"CLINICAL_T5_BASE": None}   # clinical-t5-base's local folder unset: its units fail with the variable

def _texts(nb_path) -> str:
    "Everything a reader of the notebook sees: sources and outputs."
    nb = nbformat.read(str(nb_path), as_version=4)
    out = []
    for c in nb.cells:
        out.append(c.source)
        for o in c.get("outputs", []):
            out.append(json.dumps(o.get("data", {})) + o.get("text", "") + " ".join(o.get("traceback", [])))
    return "\n".join(out)


GRID = """
grid: t
data: {{dir: {data}}}
tasks: [mednli]
finetune:
  models: [minilm-demo, roberta-base, clinical-t5-base]
  seeds: [0, 1]
  train: {{max_steps: 2, eval_steps: 2, effective_batch: 8, learning_rate_grid: null}}
icl: {{models: [t5-tiny-demo], shots: [0], limit: 6, dev_n: 4}}
compare: [[roberta-base, minilm-demo]]
"""


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_release, run_cli):
    """One run of a small grid in which two of four experiments cannot run; then one unit's results file lost (as if
    the run had been killed before it) and a rerun."""
    tmp = tmp_path_factory.mktemp("grid")
    g = tmp / "t.yaml"
    g.write_text(GRID.format(data=tiny_release[0]))
    first = run_cli("run", g, "--reports", tmp / "reports", env=NO_T5_BASE)
    gdir = tmp / "reports" / "t"
    stamp = {p: p.stat().st_mtime_ns for p in gdir.rglob("*") if p.is_file()}
    manifest = json.loads((gdir / "manifest.json").read_text())
    minilm = next(e for e in manifest["experiments"] if e["model"] == "minilm-demo")
    lost = gdir / minilm["units"][1]["results"]
    lost.unlink()
    second = run_cli("run", g, "--reports", tmp / "reports", env=NO_T5_BASE)
    return tmp, gdir, first, second, stamp


def test_failing_units_are_listed_and_the_others_complete(grid_run):
    tmp, gdir, first, _, _ = grid_run
    assert first.returncode == 1, first.stderr[-3000:]
    fails = json.loads((gdir / "failures.json").read_text())
    by_model = {}
    for f in fails:
        by_model.setdefault(f["model"], []).append(f)
    assert set(by_model) == {"roberta-base", "clinical-t5-base"}, fails
    assert len(by_model["roberta-base"]) == 2 and len(by_model["clinical-t5-base"]) == 2
    assert all("roberta-base" in f["error"] for f in by_model["roberta-base"])          # could not load offline
    assert all("CLINICAL_T5_BASE" in f["error"] for f in by_model["clinical-t5-base"])  # says which variable to set
    assert "4 unit(s) failed" in first.stderr
    m = json.loads((gdir / "manifest.json").read_text())
    ok = {(e["model"], e["mode"]): [u["status"] for u in e["units"]] for e in m["experiments"]}
    assert ok[("minilm-demo", "finetune")] == ["ok", "ok"] and ok[("t5-tiny-demo", "icl")] == ["ok"]
    for e in m["experiments"]:
        assert (gdir / e["notebook"]).is_file(), e          # every notebook is kept, failing ones too
        for u in e["units"]:
            r = json.loads((gdir / u["results"]).read_text())
            assert r["status"] == u["status"]
            if u["status"] == "failed":
                assert r["error"] and "Traceback" in r["traceback"]
    # the failing experiment's notebook shows the error to its reader
    assert "roberta-base" in _texts(gdir / "mednli" / "roberta-base__finetune.ipynb")


def test_one_results_file_per_unit(grid_run):
    _, gdir, _, _, _ = grid_run
    files = sorted((gdir / "results").glob("*.json"))
    m = json.loads((gdir / "manifest.json").read_text())
    listed = sorted(gdir / u["results"] for e in m["experiments"] for u in e["units"])
    assert files == listed and len(files) == 7   # 2 + 2 + 2 fine-tuning units, 1 ICL unit


def test_rerun_runs_only_the_lost_and_the_failed_units(grid_run):
    _, gdir, first, second, stamp = grid_run
    assert second.returncode == 1                                 # the two broken models still fail
    assert "(3 executed, 1 skipped" in second.stdout
    m = json.loads((gdir / "manifest.json").read_text())
    experiments = {(e["model"], e["mode"]): e for e in m["experiments"]}
    icl = experiments[("t5-tiny-demo", "icl")]
    assert icl["status"] == "cached"
    for path in [gdir / icl["notebook"]] + [gdir / u["results"] for u in icl["units"]]:
        assert path.stat().st_mtime_ns == stamp[path]            # not re-executed, not rewritten
    kept, lost = (gdir / u["results"] for u in experiments[("minilm-demo", "finetune")]["units"])
    assert kept.stat().st_mtime_ns == stamp[kept]                 # the finished unit of a resumed notebook is kept
    assert lost.stat().st_mtime_ns != stamp[lost] and json.loads(lost.read_text())["status"] == "ok"
    # the failed units were tried again and failed again
    assert experiments[("roberta-base", "finetune")]["status"] == "failed"


def test_notebooks_show_aggregates_only(grid_run, tiny_release):
    _, gdir, _, _, _ = grid_run
    from clinical_repro.data import load_task
    premises = [r.premise for r in load_task(tiny_release[0], "mednli").splits["test"]]
    text = _texts(gdir / "mednli" / "minilm-demo__finetune.ipynb")
    assert "accuracy" in text.lower()
    assert not [p for p in premises if p in text]


def test_summary_files(grid_run):
    _, gdir, first, _, _ = grid_run
    assert "summary" in first.stdout and "summary.html" in first.stdout
    html = (gdir / "summary.html").read_text()
    md = (gdir / "summary.md").read_text()
    assert "data:image/png;base64" in html                     # figures embedded: the file stands alone
    assert "Table 3" in md and "roberta-base" in md
    table3 = md.split("## Table 3", 1)[1].split("\n## ", 1)[0]
    assert "| baseline: majority class (" in table3 and ", from train) |" in table3   # the training data's majority
    assert "paper's protocol |" in table3                                            # the protocol column
    assert "| t5-tiny-demo (ICL, 0-shot) | MedNLI | generate |" in md.split("## Generated outputs", 1)[1]
    for link in [l.split("](")[1].rstrip(")") for l in md.splitlines() if l.startswith("![")]:
        assert (gdir / link).is_file(), link
    nb = nbformat.read(str(gdir / "summary.ipynb"), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_summarize_again_is_cached_and_force_rewrites(grid_run, run_cli):
    tmp, gdir, _, _, _ = grid_run
    r = run_cli("summarize", "--reports", tmp / "reports", env=NO_T5_BASE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unchanged inputs" in r.stdout


def test_dry_run_shows_cached_and_missing_units_and_writes_nothing(grid_run, run_cli):
    tmp, gdir, _, _, _ = grid_run
    before = {p: p.stat().st_mtime_ns for p in gdir.rglob("*") if p.is_file()}
    r = run_cli("run", tmp / "t.yaml", "--reports", tmp / "reports", "--dry-run", env=NO_T5_BASE)
    # roberta-base is a hub model that is not here: the preflight says so and the dry run exits 1
    assert r.returncode == 1 and "preflight check(s) would fail" in r.stderr, r.stderr[-2000:]
    assert "FAIL  model roberta-base" in r.stdout
    assert "minilm-demo__finetune.ipynb: 2 units, 2 cached, 0 to run" in r.stdout
    assert "roberta-base__finetune.ipynb: 2 units, 0 cached, 2 to run" in r.stdout
    assert "would run 4 of 7 units" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in gdir.rglob("*") if p.is_file()} == before


def test_template_runs_directly_with_papermill(tmp_path, tiny_release):
    out = tmp_path / "out.ipynb"
    r = subprocess.run([str(BIN / "papermill"), str(TEMPLATE), str(out), "-k", "python3", "--cwd", str(tmp_path),
                        "-p", "task", "mednli", "-p", "model", "minilm-demo", "-p", "mode", "finetune",
                        "-p", "data_dir", str(tiny_release[0]), "-p", "reports_dir", str(tmp_path / "reports"),
                        "-y", "train_overrides: {max_steps: 2, eval_steps: 2, effective_batch: 8}"],
                       capture_output=True, text=True, env=cli_env(NO_T5_BASE), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(p.read_text()) for p in (tmp_path / "reports" / "manual" / "results").glob("*.json")]
    assert [(x["status"], x["task"], x["model"], x["seed"]) for x in res] == [("ok", "mednli", "minilm-demo", 0)]
    assert res[0]["config"]["train"]["max_steps"] == 2
    assert "Examples hidden" in _texts(out)


def test_unknown_key_in_a_grid_is_refused_before_anything_runs(tmp_path, tiny_release, run_cli):
    g = tmp_path / "bad.yaml"
    g.write_text(GRID.format(data=tiny_release[0]).replace("seeds: [0, 1]", "seeds: [0, 1]\n  seed: 3"))
    r = run_cli("run", g, "--reports", tmp_path / "reports")
    assert r.returncode == 2 and "finetune.seed" in r.stderr and str(g) in r.stderr
    assert not (tmp_path / "reports").exists()


def test_a_grid_on_real_data_needs_a_data_dir(tmp_path, run_cli):
    r = run_cli("run", "paper", "--reports", tmp_path / "reports")
    assert r.returncode == 2 and "--data-dir" in r.stderr
    # a dry run still shows the plan and its estimates (on stand-ins), and its preflight names what is missing
    r = run_cli("run", "paper", "--reports", tmp_path / "reports", "--dry-run")
    assert r.returncode == 1 and "FAIL  task mednli: no data folder data: pass --data-dir" in r.stdout
    assert "estimated on a stand-in of the release's documented size" in r.stdout


def test_notebooks_get_the_run_ids_the_runner_planned(grid_run):
    "Each unit's identity is computed once, by the runner, and handed to its notebook with the unit."
    _, gdir, _, _, _ = grid_run
    m = json.loads((gdir / "manifest.json").read_text())
    for e in m["experiments"]:
        handed = nbformat.read(str(gdir / e["notebook"]), as_version=4).metadata["papermill"]["parameters"]["units"]
        assert [u["run_id"] for u in handed] == [u["run_id"] for u in e["units"]]
        assert [{k: v for k, v in u.items() if k != "run_id"} for u in handed] == [u["unit"] for u in e["units"]]


def test_ray_executor_gives_the_local_results(grid_run, tiny_release, tmp_path, run_cli):
    """The grid's two runnable experiments (2 notebooks, 2 units) on a private local Ray: the same run_ids and results
    as the fixture's local run, the same layout; a rerun starts no Ray. (Two tasks: tests/test_ray_grid.py.)"""
    pytest.importorskip("ray")
    _, gdir, _, _, _ = grid_run
    g = tmp_path / "r.yaml"
    runnable = GRID.format(data=tiny_release[0]).replace("grid: t", "grid: r")
    runnable = runnable.replace("[minilm-demo, roberta-base, clinical-t5-base]", "[minilm-demo]")
    runnable = runnable.replace("seeds: [0, 1]", "seeds: [0]")   # one unit per notebook is enough here
    g.write_text(runnable.replace("compare: [[roberta-base, minilm-demo]]", ""))
    ray = run_cli("run", g, "--reports", tmp_path, "--no-summary", "--executor", "ray", env=no_ray_cluster())
    assert ray.returncode == 0, ray.stderr[-3000:]
    on_ray, local = results_by_file(tmp_path / "r"), results_by_file(gdir)
    assert len(on_ray) == 2 and all(status == "ok" for status, _ in on_ray.values())
    assert on_ray == {name: local[name] for name in on_ray}
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["executor"] == "ray" and m["ray"]["resources"] and all(e["status"] == "ok" for e in m["experiments"])
    assert all((tmp_path / "r" / e["notebook"]).is_file() for e in m["experiments"])
    assert (tmp_path / "r" / "logs" / "mednli" / "minilm-demo__finetune.log").is_file()   # the kernel's log, on Ray too
    assert _stderr_outputs(tmp_path / "r" / "mednli" / "minilm-demo__finetune.ipynb") == ""
    again = run_cli("run", g, "--reports", tmp_path, "--no-summary", "--executor", "ray", env=no_ray_cluster())
    assert again.returncode == 0 and "(0 executed, 2 skipped" in again.stdout


# What a reader of an executed report must not see: library warnings, load reports, progress bars, INFO lines.
NOISE = ("Loading weights", "LOAD REPORT", "Writing model shards", "Warning", " INFO ", "it/s]", "unit/s]")


def _stderr_outputs(nb_path) -> str:
    "The text of a notebook's stderr stream outputs."
    nb = nbformat.read(str(nb_path), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stderr")


def test_reports_show_their_content_and_real_errors_only(grid_run):
    _, gdir, _, _, _ = grid_run
    for nb_path in sorted((gdir / "mednli").glob("*.ipynb")) + [gdir / "summary.ipynb"]:
        stderr = _stderr_outputs(nb_path)
        assert not [noise for noise in NOISE if noise in stderr], (nb_path.name, stderr[:3000])
    assert _stderr_outputs(gdir / "mednli" / "minilm-demo__finetune.ipynb") == ""
    trained = nbformat.read(str(gdir / "mednli" / "minilm-demo__finetune.ipynb"), as_version=4)
    html = [o.get("data", {}).get("text/html", "") for c in trained.cells for o in c.get("outputs", [])]
    assert not [h for h in html if "<progress" in h]   # no training progress bar (the Trainer's notebook callback)
    failing = _stderr_outputs(gdir / "mednli" / "roberta-base__finetune.ipynb")   # a failing unit still says so
    assert failing.count("ERROR") == 2 and "roberta-base" in failing, failing


def test_a_clean_run_prints_the_bar_and_each_final_line_once(grid_run):
    _, gdir, first, second, _ = grid_run
    for run in (first, second):
        terminal = run.stdout + run.stderr
        for alarming in ("TCP without encryption", "KeyboardInterrupt", " INFO ", "Warning", "scan-leaks"):
            assert alarming not in terminal, (alarming, terminal[-3000:])
        assert terminal.count("summary.html") == 1 and terminal.count("leak scan: ") == 1, terminal[-3000:]
    assert "4 unit(s) failed" in first.stderr and "roberta-base" in first.stderr     # the failures, with their errors


def test_the_logs_keep_what_the_reports_do_not_show(grid_run):
    _, gdir, _, _, _ = grid_run
    m = json.loads((gdir / "manifest.json").read_text())
    minilm = next(e for e in m["experiments"] if e["model"] == "minilm-demo")
    notebook_log = (gdir / "logs" / "mednli" / "minilm-demo__finetune.log").read_text()
    for unit in minilm["units"]:
        unit_log = (gdir / "results" / "logs" / f"{unit['run_id']}.log").read_text()
        assert f"INFO clinical_repro.unit.{unit['run_id']}: unit {unit['run_id']} done" in unit_log
        assert "LOAD REPORT" in unit_log                  # the library's messages of the unit, in the unit's log
        assert f"INFO clinical_repro.unit.{unit['run_id']}: unit {unit['run_id']}: mednli" in notebook_log
    assert "LOAD REPORT" in notebook_log
    run_log = "".join(p.read_text() for p in (gdir / "logs").glob("run-*.log"))
    assert "leak scan: " in run_log and "summary of t: " in run_log and "failed: UserError" in run_log


def test_kernels_get_short_hub_timeouts_unless_set(monkeypatch):
    "huggingface_hub reads its metadata timeout once, when a kernel imports it: the runner hands its short one over."
    from clinical_repro.grid import grid_path, load_grid
    from clinical_repro.runner import kernel_env
    grid = load_grid(grid_path("demo"))
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    assert kernel_env(grid)["HF_HUB_ETAG_TIMEOUT"] == "5"     # huggingface_hub's default: 10 s, retried five times
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "30")
    assert kernel_env(grid)["HF_HUB_ETAG_TIMEOUT"] == "30"    # the user's value wins
