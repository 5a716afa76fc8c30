"""`clinical-repro run --executor ray` on a local Ray (CPU): the same results as the local executor, into the same
layout of the reports folder."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

GRID = """
grid: r
data: {{dir: {data}}}
tasks: [mednli, radqa]
finetune: {{models: [t5-tiny-demo], seeds: [0], train: {{max_steps: 2, eval_steps: 2}}}}
icl: {{models: [t5-tiny-demo], shots: [0], limit: 4, dev_n: 4}}
"""


def _run(grid, reports, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLINICAL_REPRO_", "RAY_"))}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLINICAL_REPRO_PARAMS": str(ROOT / "params"),
                "CLINICAL_REPRO_TEMPLATES": str(ROOT / "nbs" / "experiments")})
    t = time.perf_counter()
    r = subprocess.run([str(BIN / "clinical-repro"), "run", str(grid), "--reports", str(reports), "--no-summary", *extra],
                       capture_output=True, text=True, env=env, timeout=900)
    return r, time.perf_counter() - t


def _results(gdir):
    out = {}
    for p in (gdir / "results").glob("*.json"):
        r = json.loads(p.read_text())
        out[p.name] = (r["status"], json.dumps(r["metrics"]["test"], sort_keys=True))
    return out


def test_ray_executor_gives_the_local_results(tmp_path, tiny_release):
    g = tmp_path / "r.yaml"; g.write_text(GRID.format(data=tiny_release[0]))
    ray, t_ray = _run(g, tmp_path / "ray", "--executor", "ray")
    assert ray.returncode == 0, ray.stderr[-3000:]
    local, t_local = _run(g, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    print(f"4 notebooks: ray {t_ray:.0f} s, local {t_local:.0f} s")
    a, b = _results(tmp_path / "ray" / "r"), _results(tmp_path / "local" / "r")
    assert a == b and len(a) == 4 and all(s == "ok" for s, _ in a.values())
    m = json.loads((tmp_path / "ray" / "r" / "manifest.json").read_text())
    assert m["executor"] == "ray" and m["ray"]["resources"] and all(e["status"] == "ok" for e in m["experiments"])
    for e in m["experiments"]: assert (tmp_path / "ray" / "r" / e["notebook"]).is_file()
    # rerun through Ray: nothing to do, no Ray started
    again, _ = _run(g, tmp_path / "ray", "--executor", "ray")
    assert again.returncode == 0 and "(0 executed, 4 skipped" in again.stdout
