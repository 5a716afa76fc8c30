"""`clinical-repro run --executor ray` on a local Ray (CPU): the same results as the local executor, into the same
layout of the reports folder. CI runs a sample (one task: 2 notebooks); `pytest --campaign` (or
CLINICAL_REPRO_FULL_CAMPAIGNS=1) runs two tasks (4 notebooks)."""
import json, os, time

import pytest

pytest.importorskip("ray")

GRID = """
grid: r
data: {{dir: {data}}}
tasks: [{tasks}]
finetune: {{models: [t5-tiny-demo], seeds: [0], train: {{max_steps: 2, eval_steps: 2}}}}
icl: {{models: [t5-tiny-demo], shots: [0], limit: 4, dev_n: 4}}
"""
NO_RAY_CLUSTER = {name: None for name in os.environ if name.startswith("RAY_")}   # a private local Ray, always


def _run(run_cli, grid, reports, *extra):
    started = time.perf_counter()
    r = run_cli("run", grid, "--reports", reports, "--no-summary", *extra, env=NO_RAY_CLUSTER)
    return r, time.perf_counter() - started


def _results(gdir):
    out = {}
    for p in (gdir / "results").glob("*.json"):
        r = json.loads(p.read_text())
        out[p.name] = (r["status"], json.dumps(r["metrics"]["test"], sort_keys=True))
    return out


def test_ray_executor_gives_the_local_results(tmp_path, tiny_release, run_cli, full_campaign):
    tasks = ["mednli", "radqa"] if full_campaign else ["mednli"]
    notebooks = 2 * len(tasks)   # per task: fine-tuning and ICL, one unit each
    g = tmp_path / "r.yaml"
    g.write_text(GRID.format(data=tiny_release[0], tasks=", ".join(tasks)))
    ray, t_ray = _run(run_cli, g, tmp_path / "ray", "--executor", "ray")
    assert ray.returncode == 0, ray.stderr[-3000:]
    local, t_local = _run(run_cli, g, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    print(f"{notebooks} notebooks: ray {t_ray:.0f} s, local {t_local:.0f} s")
    a, b = _results(tmp_path / "ray" / "r"), _results(tmp_path / "local" / "r")
    assert a == b and len(a) == notebooks and all(s == "ok" for s, _ in a.values())
    m = json.loads((tmp_path / "ray" / "r" / "manifest.json").read_text())
    assert m["executor"] == "ray" and m["ray"]["resources"] and all(e["status"] == "ok" for e in m["experiments"])
    for e in m["experiments"]:
        assert (tmp_path / "ray" / "r" / e["notebook"]).is_file()
    # rerun through Ray: nothing to do, no Ray started
    again, _ = _run(run_cli, g, tmp_path / "ray", "--executor", "ray")
    assert again.returncode == 0 and f"(0 executed, {notebooks} skipped" in again.stdout
