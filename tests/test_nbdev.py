"""The notebooks are the source: exporting and cleaning must change nothing, and papermill's tags must survive."""
import json, shutil, subprocess
from pathlib import Path

import nbformat

from conftest import BIN, ROOT, tree_state


def _copy_project(dst: Path) -> Path:
    for name in ("nbs", "clinical_repro", "pyproject.toml", "README.md"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / name)
    return dst


def test_export_and_clean_change_nothing(tmp_path):
    proj = _copy_project(tmp_path)
    before = tree_state(proj)
    for cmd in ("nbdev-export", "nbdev-clean"):
        r = subprocess.run([str(BIN / cmd)], cwd=proj, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    after = tree_state(proj)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and "__pycache__" not in k)
    assert not changed, f"run nbdev-export and nbdev-clean, then commit: {changed}"


def test_clean_keeps_the_papermill_parameters_tag(tmp_path):
    proj = _copy_project(tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}
    cell = nbformat.v4.new_code_cell("task = 'mednli'", metadata={"tags": ["parameters"], "collapsed": True})
    nb.cells = [cell]
    p = proj / "nbs" / "_template_probe.ipynb"
    nbformat.write(nb, p)
    r = subprocess.run([str(BIN / "nbdev-clean"), "--fname", str(p)], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads(p.read_text())["cells"][0]["metadata"]
    assert meta == {"tags": ["parameters"]}  # other cell metadata is cleaned, the tag stays


def test_every_notebook_uses_the_python3_kernel():
    for p in sorted((ROOT / "nbs").rglob("*.ipynb")):
        ks = json.loads(p.read_text())["metadata"].get("kernelspec", {})
        assert ks.get("name") == "python3", p


def test_module_notebooks_are_numbered_and_export_one_module_each():
    seen = {}
    for p in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        sources = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                   for c in cells if c["cell_type"] == "code"]
        modules = [s.split("default_exp", 1)[1].strip() for s in sources if s.startswith("#| default_exp")]
        assert len(modules) == 1, f"{p.name}: exactly one default_exp"
        assert modules[0] not in seen, f"{modules[0]} exported from {seen.get(modules[0])} and {p.name}"
        seen[modules[0]] = p.name
    assert {"core", "data", "synthetic", "metrics", "cli"} <= set(seen)


def test_readme_is_generated_from_index(tmp_path):
    r = subprocess.run([str(BIN / "jupyter"), "nbconvert", "--to", "markdown", "--log-level", "WARN",
                        str(ROOT / "nbs" / "index.ipynb"), "--output-dir", str(tmp_path), "--output", "README"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text(), "run `make readme`"
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "pyproject.toml" in text and "settings.ini" in text


def test_ci_calls_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in (ROOT / "README.md").read_text()
    assert not (ROOT / "settings.ini").exists()
