"""Crash safety: SIGKILL the grid runner (and every kernel it started) at random and at chosen moments, rerun,
and check that nothing is lost, duplicated or corrupt, and that the results equal an uninterrupted run's.

    python tests/crash_harness.py --kills 24 --out /tmp/crash      # the full set (minutes); prints the counts
    tests/test_crash.py runs a sample in CI, and the full set with `pytest --campaign`.

Kills are of two kinds: *targeted*, through the crash points the code carries (`clinical_repro.core.crash_point`:
`$CLINICAL_REPRO_CRASH_AT` = `train_step@N`, `evaluate@N`, `write:<file pattern>@N`), which kill the kernel and the
runner at that exact moment, as a power cut would; and *random*, after a random delay, which kill whatever runs then
(training, evaluation, papermill writing a notebook, the runner writing its manifest).
"""
from __future__ import annotations
import argparse, json, os, random, signal, subprocess, time, uuid
from pathlib import Path

import psutil

from conftest import BIN, cli_env, network_blocked

GRID = """
grid: crash
data: {{dir: {data}}}
tasks: [mednli]
finetune:
  models: [minilm-demo]
  seeds: [0, 1]
  train: {{max_steps: 6, eval_steps: 2, effective_batch: 4, learning_rate: 1.0e-4}}
icl: {{models: [t5-tiny-demo], shots: [0, 1], limit: 4, dev_n: 4}}
"""

# Chosen moments: mid-training (after a checkpoint), mid-evaluation, a results file being written (killed between
# the temporary file and the rename; a unit writes its predictions, item outcomes, then results: the 3rd such write),
# the runner writing its manifest.
TARGETS = ["train_step@4", "evaluate@2", "write:????????????????.json@3", "write:manifest.json@2"]


def kill_tagged(tag:str) -> int:
    "SIGKILL every process started for this run (the runner, its kernels, orphans included); returns how many."
    n = 0
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("CLINICAL_REPRO_CRASH_TAG") == tag:
                p.kill()
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return n


def run(grid:Path, reports:Path, *, crash:str|None=None, delay:float|None=None, timeout:float=600,
        env:dict|None=None) -> dict:
    """One runner process: killed after `delay` s, or by the crash point `crash`, or left to finish. What happened.
    `env` adds to the environment."""
    tag = uuid.uuid4().hex
    cmd = [str(BIN / "clinical-repro"), "run", str(grid), "--reports", str(reports), "--no-summary"]
    env = cli_env({**(env or {}), "CLINICAL_REPRO_CRASH_TAG": tag, "CLINICAL_REPRO_CRASH_AT": crash})   # None: unset
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    t0 = time.perf_counter()
    try:
        p.wait(timeout=delay if delay is not None else timeout)
    except subprocess.TimeoutExpired:
        pass
    killed_by_us = p.poll() is None
    extra = kill_tagged(tag)
    p.wait()
    err = p.stderr.read()
    p.stderr.close()
    return {"rc": p.returncode, "killed": killed_by_us or p.returncode == -signal.SIGKILL,
            "seconds": time.perf_counter() - t0,
            "orphans_killed": extra, "crash": crash, "delay": delay, "stderr_tail": err[-1500:]}


def check(reports:Path) -> dict:
    ("Every unit has exactly one valid, finished results file; nothing else in results/; no temporaries; "
     "notebooks complete.")
    gdir = reports / "crash"
    m = json.loads((gdir / "manifest.json").read_text())
    expected = sorted(u["results"] for e in m["experiments"] for u in e["units"])
    assert all(u["status"] in ("ok", "not_applicable") for e in m["experiments"] for u in e["units"]), m
    on_disk = sorted(str(p.relative_to(gdir)) for p in (gdir / "results").glob("*.json"))
    assert on_disk == expected, (on_disk, expected)
    for r in expected:
        assert json.loads((gdir / r).read_text())["status"] == "ok"
    tmps = [str(p) for p in gdir.rglob(".*.tmp")]
    assert not tmps, tmps
    for e in m["experiments"]:
        nb = json.loads((gdir / e["notebook"]).read_text())
        assert nb["metadata"]["papermill"]["end_time"] and not nb["metadata"]["papermill"]["exception"], e["notebook"]
    return {"units": len(expected)}


def outcomes(reports:Path) -> dict:
    "Per unit (model, mode, seed, shots): test metrics and the dev losses: what must equal the uninterrupted run's."
    out = {}
    for p in (reports / "crash" / "results").glob("*.json"):
        r = json.loads(p.read_text())
        hist = [round(h.get("loss", 0.0), 5) for h in r.get("dev_history", [])]
        out[(r["model"], r["mode"], r["seed"], r["shots"], r["fraction"])] = (
            json.dumps(r["metrics"]["test"], sort_keys=True), hist)
    return out


def summary_tables(md:str) -> dict:
    "The sections of summary.md that hold results (not cost, time or provenance)."
    parts, head = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            head = line[3:]
        elif head and any(head.startswith(h) for h in ("Table 3", "Clinical vs general", "Paired", "Limited data",
                                                        "In-context")):
            parts.setdefault(head, []).append(line)
    return parts


def tables_of(reports:Path, env:dict|None=None) -> dict:
    "`clinical-repro summarize` on a finished reports folder: its result tables."
    command = [str(BIN / "clinical-repro"), "summarize", "--reports", str(reports / "crash"), "--n-boot", "200"]
    r = subprocess.run(command, env=cli_env(env), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return summary_tables((reports / "crash" / "summary.md").read_text())


def _verify(done:Path, clean:Path, clean_tables:dict|None) -> int:
    """A finished, once-interrupted reports folder: the checks, the same results as `clean`, and (when `clean_tables`
    are given) the same summary tables."""
    counts = check(done)
    a, b = outcomes(clean), outcomes(done)
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, {k: (a[k], b[k]) for k in diff}
    if clean_tables is not None:
        tables = tables_of(done)
        assert tables == clean_tables, (tables, clean_tables)
    return counts["units"]


def campaign(out:Path, data:Path, kills:int, seed:int=0, log=print) -> dict:
    """A clean run; then the targeted kills, one after another on one reports folder; then random kills in rounds of
    two on fresh folders (a kill at a random moment of a run with all its work ahead, a second one in the rerun),
    each round finished and checked against the clean run.

    The clean run and its summary are made with the network blocked and the Hugging Face offline switches unset
    (`conftest.network_blocked`): the demo models must never reach for the network (the result holds the attempts)."""
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "crash.yaml"
    grid.write_text(GRID.format(data=data))
    no_network = network_blocked(out)
    clean = run(grid, out / "clean", env=no_network)
    assert clean["rc"] == 0, clean
    clean_tables = tables_of(out / "clean", env=no_network)
    attempts = Path(no_network["NET_ATTEMPTS_LOG"])
    clean_s = clean["seconds"]
    if kills > len(TARGETS):   # random delays are drawn from a warm run (the first one also builds caches)
        warm = run(grid, out / "clean-again")
        assert warm["rc"] == 0, warm
        clean_s = warm["seconds"]
    log(f"uninterrupted run: {clean['seconds']:.0f} s cold, {clean_s:.0f} s warm")
    rng = random.Random(seed)
    events, folders = [], []
    def kill(kind, folder, crash=None, delay=None):
        e = run(grid, folder, crash=crash, delay=delay)
        e["kind"] = kind
        events.append(e)
        log(f"{kind:6s} {folder.name:8s} {crash or f'after {delay:.1f} s':32s} -> "
            f"{'killed' if e['killed'] else 'finished first'} "
            f"(rc {e['rc']}, {e['seconds']:.1f} s, {e['orphans_killed']} other process(es) killed)")
    targeted = TARGETS[:kills]
    if targeted:
        folders.append(out / "targeted")
    for c in targeted:
        kill("target", out / "targeted", crash=c)
    for r in range((kills - len(targeted) + 1) // 2):
        folder = out / f"round{r}"
        folders.append(folder)
        kill("random", folder, delay=rng.uniform(3.0, 0.9 * clean_s))
        if len(events) < kills:
            kill("random", folder, delay=rng.uniform(3.0, 0.6 * clean_s))
    units = 0
    for folder in folders:
        final = run(grid, folder)
        assert final["rc"] == 0, final
        # the sample (targeted kills only) checks every unit's results; the full campaign also the summary tables
        units = _verify(folder, out / "clean", clean_tables if kills > len(TARGETS) else None)
    return {"kills_tried": len(events), "kills_landed": sum(e["killed"] for e in events),
            "targeted_landed": sum(e["killed"] for e in events if e["kind"] == "target"),
            "random_landed": sum(e["killed"] for e in events if e["kind"] == "random"),
            "folders_checked": len(folders), "units": units, "clean_seconds": round(clean_s, 1), "events": events,
            "network_attempts": attempts.read_text() if attempts.exists() else "",
            "network_guarded_processes": len(Path(f"{attempts}.processes").read_text().split())}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--out", default="/tmp/crash-harness")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from clinical_repro.synthetic import write_demo_data
    out = Path(args.out)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    data = out / "data"
    write_demo_data(data, seed=3, size="tiny")
    res = campaign(out, data, args.kills, args.seed)
    print(json.dumps({k: v for k, v in res.items() if k != "events"}, indent=1))
    print("every unit: exactly one valid results file; metrics and dev losses equal to the uninterrupted run's")
