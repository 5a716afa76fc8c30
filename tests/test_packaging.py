"""The installable package: the wheel carries params/ and the papermill templates, and an installed copy runs from any
folder, with no clone beside it, on its packaged defaults."""
import hashlib, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path

import pytest

import clinical_repro
from conftest import PARAMS, ROOT, TEMPLATES, cli_env

# What the copy of the checkout the wheel is built from leaves out: outputs, environments, caches.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "reports", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ipynb_checkpoints")
# An installed package finds its own files: no variable points into the checkout.
PACKAGED = {"CLINICAL_REPRO_PARAMS": None, "CLINICAL_REPRO_TEMPLATES": None}
TINY_GRID = """
grid: t
data: {{dir: {data}}}
tasks: [mednli]
icl: {{models: [t5-tiny-demo], shots: [0], limit: 6, dev_n: 4}}
"""


def sha256(data:bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repository_data() -> dict[str, str]:
    "Path inside the wheel -> sha256, for every file of the checkout's params/ (recursively) and template notebooks."
    files = {f"clinical_repro/params/{path.relative_to(PARAMS).as_posix()}": path
             for path in PARAMS.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    files.update({f"clinical_repro/templates/{path.name}": path for path in TEMPLATES.glob("*.ipynb")})
    return {name: sha256(path.read_bytes()) for name, path in files.items()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The wheel, built offline (this venv's setuptools) from a copy of the checkout, so its build/ is not reused."
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(source), "-w", str(tmp / "dist")], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (tmp / "dist").glob("clinical_repro-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (installed --no-deps); a .pth file lends it this venv's site-packages (and
    the system's, when this venv sees them: a GPU server's torch) for the dependencies (torch, transformers, papermill,
    ...), after its own, so the wheel's copy is the one imported."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lent = [path for path in sys.path if path.endswith("site-packages")]   # a venv's own, and the system's it sees
    Path(purelib, "dependencies.pth").write_text("".join(f"{path}\n" for path in lent))
    # nbconvert's HTML templates are data files of a lent dependency (a real install puts them in the venv's share/);
    # the kernel spec is not lent: papermill starts the venv's own Python.
    (venv / "share" / "jupyter").mkdir(parents=True)
    (venv / "share" / "jupyter" / "nbconvert").symlink_to(Path(sys.prefix) / "share" / "jupyter" / "nbconvert")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-compile", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def run_installed(venv, *args, cwd, timeout=900) -> subprocess.CompletedProcess:
    "The installed `clinical-repro` in `cwd`, offline, with no variable pointing into the checkout."
    return subprocess.run([str(venv / "bin" / "clinical-repro"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(PACKAGED), timeout=timeout)


def test_the_wheel_carries_every_params_file_and_template(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: sha256(archive.read(name)) for name in archive.namelist()
                   if name.startswith(("clinical_repro/params/", "clinical_repro/templates/"))}
        version = wheel.name.split("-")[1]
    assert shipped == repository_data()   # each file, byte for byte, and nothing else
    assert {"clinical_repro/params/demo.yaml", "clinical_repro/params/prompts/mednli.yaml",
            "clinical_repro/templates/experiment.ipynb"} <= set(shipped)
    assert version == clinical_repro.__version__


def test_an_installed_package_uses_its_own_copies(installed, tmp_path):
    code = ("from clinical_repro import config, runner; print(config.default_params_dir()); "
            "print(runner.templates_dir())")
    found = subprocess.run([installed / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env=cli_env(PACKAGED))
    assert found.returncode == 0, found.stderr
    params, templates = map(Path, found.stdout.split())
    assert params.name == "params" and templates.name == "templates"
    for folder in (params, templates):
        assert folder.parent.parent.parent.parent == installed / "lib", folder   # <venv>/lib/pythonX.Y/site-packages
    assert not params.is_relative_to(ROOT)


def test_installed_command_version_and_demo_dry_run_from_an_empty_folder(installed, tmp_path):
    version = run_installed(installed, "--version", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"clinical-repro {clinical_repro.__version__}\n")
    planned = run_installed(installed, "run", "demo", "--dry-run", "--data-size", "tiny", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "grid demo-tiny" in planned.stdout and "would run" in planned.stdout
    assert f"reports {tmp_path / 'reports' / 'demo-tiny'}" in planned.stdout   # the working folder's reports/


def test_installed_command_runs_a_grid_and_its_summary_from_an_empty_folder(installed, tiny_release, tmp_path):
    grid = tmp_path / "grids" / "t.yaml"
    grid.parent.mkdir()
    grid.write_text(TINY_GRID.format(data=tiny_release[0]))
    work = tmp_path / "work"
    work.mkdir()
    done = run_installed(installed, "run", grid, "--jobs", "1", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"manifest.json", "summary.md", "summary.html", "summary.ipynb"} <= {
        path.name for path in (work / "reports" / "t").iterdir()}
    assert (work / "reports" / "t" / "mednli" / "t5-tiny-demo__icl.ipynb").is_file()


def test_missing_package_data_is_a_clear_error(tmp_path, monkeypatch):
    from clinical_repro import config, runner
    from clinical_repro.core import UserError
    monkeypatch.setenv("CLINICAL_REPRO_TEMPLATES", str(tmp_path))
    with pytest.raises(UserError, match=f"no experiment template in {tmp_path} .*expected experiment.ipynb"):
        runner.templates_dir()
    assert config.shipped_dir("params", "params", "no-such-file.yaml") is None   # neither copy: no folder
