"""Governance: the leak scan finds planted canary sentences wherever reports hide them, and nothing else;
the data-location guard refuses a data folder git could commit."""
import argparse, ast, csv, io, json, os, re, shutil, subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from clinical_repro.core import UserError
from clinical_repro.data import load_task
from clinical_repro.governance import scan_leaks, cmd_scan_leaks, check_data_location, network_guard_env
from clinical_repro.results import fake_results
from conftest import find

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# unusual sentences, no 8-gram in common with each other or with the synthetic data
A = "the violet heron audited seventeen copper lanterns beside quiet harbour walls"            # 11 words
B = "marzipan glaciers whispered ninety brittle sonnets toward amber lighthouse keepers tonight"  # 11
C = "a tangerine walrus catalogued forty velvet umbrellas under the sleepy observatory dome"    # 12
D = "crimson tortoises rehearsed eleven jazz ballads inside the abandoned paper mill"           # 11
E = "wandering cobalt foxes painted thirteen silver kites above misty cedar valleys"            # 11
PRED = "predictions/ (per-item predictions: derived data)"


def _words(s):
    return len(s.split())


@pytest.fixture
def planted(release):
    """Canaries planted in the tiny releases: A a MedNLI test premise, E a MedNLI train hypothesis, C appended to a
    RadQA dev report, D one sentence of a CLIP test note. Returns the data folder and where each canary went."""
    where = {}
    for split, idx, key, text in (("test", 0, "sentence1", A), ("train", 4, "sentence2", E)):
        f = find(release, f"mli_{split}_v1.jsonl")
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        rows[idx][key] = text.capitalize() + "."
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        where["A" if text == A else "E"] = rows[idx]["pairID"]
    f = find(release, "dev.json")
    squad = json.loads(f.read_text())
    para = squad["data"][0]["paragraphs"][0]
    para["context"] += " " + C.capitalize() + "."  # appended: the answer offsets stay valid
    f.write_text(json.dumps(squad))
    where["C"] = squad["data"][0]["title"]
    f = find(release, "sentence_level.csv")
    rows = list(csv.reader(io.StringIO(f.read_text(), newline="")))
    doc = find(release, "test_ids.csv").read_text().split()[0]
    sents = {int(r[1]): r for r in rows[1:] if r[0] == doc}
    # a sentence followed by one of at least 4 tokens, for the span across a sentence boundary
    i = next(k for k in sorted(sents) if k + 1 in sents and len(ast.literal_eval(sents[k + 1][2])) >= 4)
    sents[i][2] = str(D.capitalize().split() + ["."])
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    f.write_text(out.getvalue())
    where["D"] = f"{doc}:{i}"
    where["D_next"] = [t.lower() for t in ast.literal_eval(sents[i + 1][2]) if t.isalnum()][:4]
    for t in ("mednli", "radqa", "clip"):
        load_task(release, t)  # still valid releases
    return release, where


def _notebook(path, cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def _write(path, text, binary=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if binary else path.write_text(text)


@pytest.fixture
def reports(planted, tmp_path):
    "A reports folder where the canaries hide in every kind of file, beside files that only look close."
    data, where = planted
    g = tmp_path / "reports" / "g"
    df = pd.DataFrame({"premise": [A.capitalize() + "."], "gold": ["entailment"], "predicted": ["neutral"]})
    _notebook(g / "mednli" / "m__finetune.ipynb", [
        nbformat.v4.new_markdown_cell("# MedNLI\nAggregates only &amp; <b>no text</b>."),
        nbformat.v4.new_code_cell("error_examples('mednli', data_dir, results_dir, run_id)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="5 errors\n"),
            nbformat.v4.new_output("display_data", data={"text/html": df.to_html()})]),   # A via pandas HTML
        nbformat.v4.new_code_cell("s", outputs=[  # A in a Python repr with an escaped line break
            nbformat.v4.new_output("execute_result", data={"text/plain": repr(A.replace(" seventeen", "\nseventeen"))},
                                   execution_count=3)])])
    # B is in no source: however verbatim, it is no leak
    _write(g / "summary.html", "<html><body><table>\n"
                               "<tr><td>Marzipan <b>glaciers</b> whispered&nbsp;ninety brittle</td>"
                               "\n<td>sonnets toward amber&#32;lighthouse keepers tonight</td></tr>\n"
                               "</table></body></html>\n")
    _write(g / "summary.md", "# Summary\n\n| report | text |\n|---|---|\n"
                             "| 1 | A _tangerine_ walrus **catalogued** forty "
                             "velvet umbrellas under the sleepy observatory dome. |\n")
    _write(g / "results" / "logs" / "u1.log", f"2026-01-01 INFO start\n2026-01-01 INFO unit b1: {D.capitalize()}.\n")
    _write(g / "results" / "logs" / "u2.log", "xqzz the abandoned paper mill " + " ".join(where["D_next"]) + " zzqx\n")
    fake_results(g / "results", run_id="abc123", metrics={"dev": {"accuracy": 0.5}, "test": {}},
                 examples=[{"hypothesis": E.capitalize() + "."}])
    _write(g / "results" / "items" / "abc123.json", json.dumps({"ids": ["1", "2"], "tokens": D.split()}))
    # look close but are not leaks: 7 words of A, aggregates, the canaries' words out of order
    _write(g / "notes.txt", "we saw " + " ".join(A.split()[:7]) + " then stopped\n")
    _write(g / "logs" / "run-1.log", "grid g: 4 units, accuracy 0.51 f1 0.49\n" + " ".join(reversed(A.split())) + "\n")
    _write(g / "results" / "subsets" / "mednli-seed0.json", json.dumps({"0.01": ["a", "b"]}))
    # not scanned: predictions (derived data), checkpoints, binaries
    _write(g / "results" / "predictions" / "abc123.json", json.dumps({"x": A, "y": B, "z": C, "w": D, "v": E}))
    _write(g / "results" / "work" / "abc123" / "trainer_state.json", json.dumps({"log": A}))
    _write(g / "figures" / "f.png", b"\x89PNG\r\n\x1a\n" + A.encode(), binary=True)
    return tmp_path / "reports", data, where


def _key(l):
    return (l.file, l.location, l.tokens, l.task, l.split, l.field, l.record)


def test_every_planted_span_is_found_where_it_is_and_nothing_else(reports):
    rep, data, where = reports
    res = scan_leaks(data, rep, progress=False)
    expected = {
        ("g/mednli/m__finetune.ipynb", "cell 2 output 2", _words(A), "mednli", "test", "premise", where["A"]),
        ("g/mednli/m__finetune.ipynb", "cell 3 output 1", _words(A), "mednli", "test", "premise", where["A"]),
        ("g/summary.md", "line 5", _words(C), "radqa", "dev", "context", where["C"]),
        ("g/results/logs/u1.log", "line 2", _words(D), "clip", "test", "sentence", where["D"]),
        ("g/results/logs/u2.log", "line 1", 8, "clip", "test", "sentence", where["D"]),  # across a sentence boundary
        ("g/results/abc123.json", "examples[0].hypothesis", _words(E), "mednli", "train", "hypothesis", where["E"]),
        ("g/results/items/abc123.json", "tokens[0] to tokens[10]", _words(D), "clip", "test", "sentence", where["D"]),
    }
    assert {_key(l) for l in res.leaks} == expected
    assert len(res.leaks) == len(expected)
    assert res.tasks_scanned == ["mednli", "radqa", "clip"] and res.tasks_skipped == {}
    # 11 files written, 3 of them not scanned: predictions/, work/, the PNG
    assert res.files_scanned == 10
    assert res.files_skipped == {PRED: 1, "work/ (checkpoints)": 1, "binary files": 1}
    assert not res.clean


def test_a_canary_in_the_data_is_found_in_html_split_by_tags_and_entities(planted, tmp_path):
    data, where = planted
    _write(tmp_path / "r" / "page.html", "<p>The <span class='x'>violet</span>\n<i>heron</i>&#32;audited&nbsp;seventeen"
                                          "<!-- a comment -->copper</p><p>lanterns&#10;beside quiet harbour walls.</p>")
    (l,) = scan_leaks(data, tmp_path / "r", progress=False).leaks
    assert _key(l) == ("page.html", "lines 1-2", 11, "mednli", "test", "premise", where["A"])


def test_min_tokens_sets_the_shortest_span_that_counts(reports):
    rep, data, where = reports
    assert not [l for l in scan_leaks(data, rep, progress=False).leaks if l.file == "g/notes.txt"]
    (l,) = [l for l in scan_leaks(data, rep, min_tokens=7, progress=False).leaks if l.file == "g/notes.txt"]
    assert (l.location, l.tokens, l.record) == ("line 1", 7, where["A"])
    # a span of exactly 8 is found at 8 and not at 9
    assert [l.tokens for l in scan_leaks(data, rep, progress=False).leaks if l.file == "g/results/logs/u2.log"] == [8]
    assert not [l for l in scan_leaks(data, rep, min_tokens=9, progress=False).leaks
                if l.file == "g/results/logs/u2.log"]


def test_predictions_are_not_scanned_and_the_text_is_never_copied(reports):
    rep, data, _ = reports
    res = scan_leaks(data, rep / "g" / "results", progress=False)
    assert res.files_skipped == {PRED: 1, "work/ (checkpoints)": 1}
    assert not [l for l in res.leaks if "predictions" in l.file] and {l.file for l in res.leaks} == {
        "logs/u1.log", "logs/u2.log", "abc123.json", "items/abc123.json"}
    dumped = json.dumps(scan_leaks(data, rep, progress=False).to_dict())
    assert not any(w in dumped for w in ("heron", "walrus", "tortoises", "foxes"))
    previews = {l.preview for l in scan_leaks(data, rep, show_text=True, progress=False).leaks}
    assert "the violet heron" in previews and all(len(p.split()) == 3 for p in previews)


def test_a_missing_task_is_skipped_and_said(reports):
    rep, data, where = reports
    shutil.rmtree(data / "clip")
    res = scan_leaks(data, rep, progress=False)
    assert list(res.tasks_skipped) == ["clip"] and "physionet.org" in res.tasks_skipped["clip"]
    assert {l.task for l in res.leaks} == {"mednli", "radqa"}
    assert "not scanned, release not found: clip" in res.verdict()
    for t in ("mednli", "radqa"): shutil.rmtree(data / t)
    with pytest.raises(UserError, match="no task found"): scan_leaks(data, rep, progress=False)


def test_short_sources_are_counted_as_undetectable(planted, tmp_path):
    data, _ = planted
    (tmp_path / "r").mkdir()
    res = scan_leaks(data, tmp_path / "r", progress=False)
    td = load_task(data, "mednli")
    hyps = [r.hypothesis for s in td.splits.values() for r in s]
    assert res.too_short["mednli hypothesis"] == [sum(len(re.findall("[A-Za-z0-9]+", h)) < 8 for h in hyps), len(hyps)]


def test_cli_handler_exits_1_on_leaks_and_0_when_clean(reports, run_main):
    rep, data, _ = reports
    rc, out, err = run_main("scan-leaks", "--data-dir", data, "--reports", rep)
    lines = out.splitlines()
    assert rc == 1 and lines[0].startswith("scanned 10 report file(s) against") and "7 leak(s)" in lines[0]
    assert len(lines) == 8 and "g/summary.md: line 5: 12-token span of radqa dev report" in out
    assert "heron" not in out + err and "show_examples" in err
    rc, out, _ = run_main("scan-leaks", "--data-dir", data, "--reports", rep / "g" / "logs")
    assert rc == 0 and out.strip().endswith("no verbatim span of ≥ 8 tokens")
    rc, out, _ = run_main("scan-leaks", "--data-dir", data, "--reports", rep, "--min-tokens", "12", "--json")
    rep_json = json.loads(out)
    assert rc == 1 and rep_json["min_tokens"] == 12 and [l["file"] for l in rep_json["leaks"]] == ["g/summary.md"]
    # the handler also takes a plain Namespace
    assert cmd_scan_leaks(argparse.Namespace(data_dir=str(data), reports=str(rep / "g" / "logs"), min_tokens=8,
                                             json=True, show_text=False)) == 0


# --- the data folder stays out of git -------------------------------------------------------------------------

def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None: pytest.skip("git not installed")
    r = tmp_path / "repo"
    (r / "physionet" / "mednli").mkdir(parents=True)
    (r / "physionet" / "mednli" / "mli_train_v1.jsonl").write_text("{}\n")
    _git(tmp_path, "init", "-q", str(r))
    _git(r, "config", "user.email", "t@example.org")
    _git(r, "config", "user.name", "t")
    return r


def test_data_inside_a_repo_and_not_ignored_is_refused(repo):
    with pytest.raises(UserError) as e: check_data_location(repo / "physionet")
    msg = str(e.value)
    assert str(repo / "physionet") in msg and str(repo.resolve()) in msg and ".gitignore" in msg and "outside" in msg


def test_ignored_data_passes_and_so_does_a_folder_inside_it(repo):
    (repo / ".gitignore").write_text("physionet/\nlater/\n")
    check_data_location(repo / "physionet")
    check_data_location(repo / "physionet" / "mednli")
    check_data_location(repo / "later")  # a folder still to be written, matched by a folder rule
    with pytest.raises(UserError, match="not git-ignored"): check_data_location(repo / "elsewhere")
    _git(repo, "add", ".gitignore")
    _git(repo, "commit", "-q", "-m", "ignore data")
    check_data_location(repo / "physionet")


def test_tracked_data_is_refused_even_when_ignored(repo):
    _git(repo, "add", "physionet")
    _git(repo, "commit", "-q", "-m", "oops")
    (repo / ".gitignore").write_text("physionet/\n")
    with pytest.raises(UserError, match="tracked by the git repository.*rm -r --cached"):
        check_data_location(repo / "physionet")


def test_data_outside_any_repo_passes(tmp_path):
    (tmp_path / "data").mkdir()
    check_data_location(tmp_path / "data")
    check_data_location(tmp_path / "not-written-yet")


def test_network_guard_env():
    env = network_guard_env()
    assert {k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE")} == \
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    online = network_guard_env(offline=False)
    assert ("HF_HUB_OFFLINE" not in online and online["HF_HUB_DISABLE_TELEMETRY"] == "1"
            and online["DO_NOT_TRACK"] == "1")
