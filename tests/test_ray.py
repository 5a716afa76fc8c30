"""The Ray executor: notebooks run as Ray tasks on a local CPU Ray, write their files, and report failures as text."""
import os
from pathlib import Path

import nbformat
import pytest

ray = pytest.importorskip("ray")

from clinical_repro.core import UserError
from clinical_repro.executors import run_on_ray


def _template(path: Path) -> Path:
    "A papermill template: writes the thread count and a marker from its env to `out`, or raises when `fail`."
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}
    nb.cells = [
        nbformat.v4.new_code_cell("out = ''\nfail = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("if fail: raise ValueError('unit exploded on purpose')"),
        nbformat.v4.new_code_cell("import os\nopen(out, 'w').write(os.environ.get('OMP_NUM_THREADS', '?') + ' ' + "
                                  "os.environ.get('CR_MARK', '-'))"),
    ]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def no_ray_address(monkeypatch):
    "No cluster address and no existing connection: run_on_ray must start (and stop) its own local Ray."
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if ray.is_initialized(): ray.shutdown()


def test_local_ray_runs_notebooks_reports_failures_and_shuts_down(tmp_path, no_ray_address):
    tpl = _template(tmp_path / "template.ipynb")
    reports = tmp_path / "reports"
    calls = [{"template": str(tpl), "out_nb": str(reports / f"nb{i}.ipynb"),
              "params": {"out": str(reports / f"out{i}.txt"), "fail": i == 1}, "env": {"CR_MARK": f"m{i}"}}
             for i in range(3)]
    # a task whose body raises on the worker (an environment variable name the OS refuses)
    calls.append({"template": str(tpl), "out_nb": str(reports / "nb3.ipynb"),
                  "params": {"out": str(reports / "out3.txt")}, "env": {"BAD=NAME": "x"}})
    done = []
    info = run_on_ray(calls, lambda i, err: done.append((i, err)), max_parallel=2)

    assert not ray.is_initialized()  # the local Ray it started is gone
    assert sorted(i for i, _ in done) == [0, 1, 2, 3]  # once per call
    errors = dict(done)
    assert errors[0] is None and errors[2] is None
    assert "ValueError" in errors[1] and "unit exploded on purpose" in errors[1]
    assert errors[3].startswith("the Ray task failed:") and "environment variable" in errors[3]
    # each kernel saw its own env, and one thread (a CPU-only cluster)
    assert (reports / "out0.txt").read_text() == "1 m0"
    assert (reports / "out2.txt").read_text() == "1 m2"
    assert not (reports / "out1.txt").exists() and not (reports / "out3.txt").exists()
    assert (reports / "nb1.ipynb").exists()  # the failed notebook is kept, as far as it got
    assert info["address"] == "local" and info["per_task"] == {"num_cpus": 1}
    assert info["resources"]["CPU"] == os.cpu_count()
    assert [c["error"] for c in info["calls"]] == [errors[i] for i in range(4)]
    assert "CR_MARK" not in os.environ  # the calls' env went to the workers, not the driver


def test_malformed_calls_and_missing_ray_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="expected a dict with template, out_nb, params"):
        run_on_ray([{"template": "t.ipynb"}], lambda i, e: None)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'clinical_repro\[ray\]'"):
        run_on_ray([], lambda i, e: None)
