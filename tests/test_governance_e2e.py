"""Governance end to end: canaries planted in the data reach the reports only when a grid sets show_examples, and
the runner's leak scan catches them then. (A grid run with the network blocked: tests/test_runner.py.)"""
import json

from conftest import ROOT, find
CANARIES = ["the violet heron audited seventeen copper lanterns beside quiet harbour walls",
            "marzipan glaciers whispered ninety brittle sonnets toward amber lighthouse keepers tonight",
            "a tangerine walrus catalogued forty velvet umbrellas under the sleepy observatory dome"]

GRID = """
grid: {name}
data: {{dir: {data}}}
tasks: [mednli]
show_examples: {show}
finetune: {{models: [t5-tiny-demo], seeds: [0], train: {{max_steps: 2, eval_steps: 2}}}}
"""


def test_canaries_leak_only_with_show_examples_and_the_scan_catches_them(release, tmp_path, run_cli):
    # The first test premises become canaries; the untrained tiny T5 gets every item wrong, so the examples view
    # (the first wrongly predicted items) shows exactly them when it is allowed to.
    f = find(release, "mli_test_v1.jsonl")
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    for r, c in zip(rows, CANARIES):
        r["sentence1"] = c.capitalize() + "."
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = [r["pairID"] for r in rows[:len(CANARIES)]]
    reports = tmp_path / "reports"
    for name, show in (("hidden", "false"), ("shown", "true")):
        (tmp_path / f"{name}.yaml").write_text(GRID.format(name=name, data=release, show=show))
    off = run_cli("run", tmp_path / "hidden.yaml", "--reports", reports, "--n-boot", "50")
    assert off.returncode == 0, off.stderr[-3000:]
    assert "leak scan:" in off.stdout and "no verbatim span" in off.stdout
    text = "".join(p.read_text(errors="ignore") for p in (reports / "hidden").rglob("*")
                   if p.is_file() and "predictions" not in p.parts)
    assert not any(c in text.lower() for c in CANARIES)

    # show_examples reaches the notebooks only (the summary never reads it): no summary for this run
    on = run_cli("run", tmp_path / "shown.yaml", "--reports", reports, "--no-summary")
    assert on.returncode == 1 and "LEAK SCAN" in on.stderr, (on.stdout[-2000:], on.stderr[-2000:])
    assert json.loads((reports / "shown" / "manifest.json").read_text())["leak_scan"]["leaks"] >= len(CANARIES)
    scan = run_cli("scan-leaks", "--data-dir", release, "--reports", reports / "shown", "--json")
    assert scan.returncode == 1
    leaks = json.loads(scan.stdout)["leaks"]
    assert {l["record"] for l in leaks} >= set(ids)
    assert {l["file"] for l in leaks} == {"mednli/t5-tiny-demo__finetune.ipynb"}   # the examples view, nowhere else
    assert not any(c in scan.stdout.lower() for c in CANARIES)                     # the scan never prints the text


def test_the_committed_example_summary_holds_no_text_of_its_data(tmp_path):
    "reports/example-demo (shown by the README) is scanned against the synthetic data it was made from."
    from clinical_repro.synthetic import write_demo_data
    from clinical_repro.governance import scan_leaks
    example = ROOT / "reports" / "example-demo"
    figures = sorted(p.name for p in (example / "figures").glob("*.png"))
    assert (example / "summary.md").is_file() and figures
    assert all(f"figures/{f}" in (example / "summary.md").read_text() for f in figures)
    assert "reports/example-demo/figures/limited_data.png" in (ROOT / "README.md").read_text()
    write_demo_data(tmp_path / "data", seed=0, size="demo")   # params/demo.yaml's data
    rep = scan_leaks(tmp_path / "data", example, progress=False)
    assert rep.files_scanned >= 1 and not rep.leaks, [str(l) for l in rep.leaks]
