"""Governance end to end: canaries planted in the data reach the reports only when a grid sets show_examples, and
the runner's leak scan catches them then; the demo runs with the network blocked."""
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

    on = run_cli("run", tmp_path / "shown.yaml", "--reports", reports, "--n-boot", "50")
    assert on.returncode == 1 and "LEAK SCAN" in on.stderr, (on.stdout[-2000:], on.stderr[-2000:])
    assert json.loads((reports / "shown" / "manifest.json").read_text())["leak_scan"]["leaks"] >= len(CANARIES)
    scan = run_cli("scan-leaks", "--data-dir", release, "--reports", reports / "shown", "--json")
    assert scan.returncode == 1
    leaks = json.loads(scan.stdout)["leaks"]
    assert {l["record"] for l in leaks} >= set(ids)
    assert {l["file"] for l in leaks} == {"mednli/t5-tiny-demo__finetune.ipynb"}   # the examples view, nowhere else
    assert not any(c in scan.stdout.lower() for c in CANARIES)                     # the scan never prints the text


SITE = '''
import os, socket
_LOG = os.environ["NET_ATTEMPTS_LOG"]
_LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
def _host(address):
    return address[0] if isinstance(address, tuple) else address
def _blocked(what, address):
    with open(_LOG, "a") as f: f.write(f"{os.getpid()} {what} {address!r}\\n")
    raise OSError(101, f"network blocked by the test: {what} {address!r}")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL: _blocked("connect", address)
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL: _blocked("connect", address)
    return _connect_ex(self, address)
def getaddrinfo(host, *a, **k):
    if host not in _LOCAL and host is not None: _blocked("resolve", host)
    return _getaddrinfo(host, *a, **k)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def test_demo_models_run_with_the_network_blocked(tmp_path, tiny_release, run_cli):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    log = tmp_path / "attempts.log"
    grid = tmp_path / "net.yaml"
    grid.write_text(f"""
grid: net
data: {{dir: {tiny_release[0]}}}
tasks: [mednli]
finetune: {{models: [minilm-demo], seeds: [0], train: {{max_steps: 2, eval_steps: 2, effective_batch: 8}}}}
icl: {{models: [t5-tiny-demo], shots: [1], limit: 4, dev_n: 4}}
""")
    # HF_HUB_OFFLINE unset on purpose: the runner itself must keep the libraries off the network.
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
           "PYTHONPATH": site, "NET_ATTEMPTS_LOG": log}
    r = run_cli("run", grid, "--reports", tmp_path / "reports", "--n-boot", "50", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not log.exists(), log.read_text()


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
