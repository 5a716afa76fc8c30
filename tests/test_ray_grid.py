"""`clinical-repro run --executor ray` on a local Ray (CPU), in full: two tasks (4 notebooks) on Ray and locally, the
same results into the same layout. Behind `pytest --campaign` (or CLINICAL_REPRO_FULL_CAMPAIGNS=1); CI runs the
sample in tests/test_runner.py (the runner's grid on Ray, against its local run)."""
import json, time

import pytest

from conftest import no_ray_cluster, results_by_file

pytest.importorskip("ray")

GRID = """
grid: r
data: {{dir: {data}}}
tasks: [mednli, radqa]
finetune: {{models: [t5-tiny-demo], seeds: [0], train: {{max_steps: 2, eval_steps: 2}}}}
icl: {{models: [t5-tiny-demo], shots: [0], limit: 4, dev_n: 4}}
"""


def _run(run_cli, grid, reports, *extra):
    started = time.perf_counter()
    r = run_cli("run", grid, "--reports", reports, "--no-summary", *extra, env=no_ray_cluster())
    return r, time.perf_counter() - started


@pytest.mark.campaign
def test_ray_executor_gives_the_local_results_on_two_tasks(tmp_path, tiny_release, run_cli):
    g = tmp_path / "r.yaml"
    g.write_text(GRID.format(data=tiny_release[0]))
    ray, t_ray = _run(run_cli, g, tmp_path / "ray", "--executor", "ray")
    assert ray.returncode == 0, ray.stderr[-3000:]
    local, t_local = _run(run_cli, g, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    print(f"4 notebooks: ray {t_ray:.0f} s, local {t_local:.0f} s")
    a, b = results_by_file(tmp_path / "ray" / "r"), results_by_file(tmp_path / "local" / "r")
    assert a == b and len(a) == 4 and all(s == "ok" for s, _ in a.values())
    m = json.loads((tmp_path / "ray" / "r" / "manifest.json").read_text())
    assert m["executor"] == "ray" and m["ray"]["resources"] and all(e["status"] == "ok" for e in m["experiments"])
    again, _ = _run(run_cli, g, tmp_path / "ray", "--executor", "ray")
    assert again.returncode == 0 and "(0 executed, 4 skipped" in again.stdout
