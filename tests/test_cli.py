"""The user-facing commands end to end on synthetic releases: demo-data, check-data, score, subsets."""
import argparse, importlib.metadata, json, random, shutil, zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from clinical_repro.core import SPLITS
from clinical_repro.data import load_task
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS, TASKS, data_fractions, get_task
import squad2_reference
import yaml
from conftest import ROOT, find, tree_state


def test_check_data_reports_exactly_what_demo_data_wrote(tiny_release, run_main):
    d, written = tiny_release
    rc, out, _ = run_main("check-data", "--data-dir", d, "--json")
    assert rc == 0
    rep = json.loads(out)
    for t in TASKS:
        assert rep[t]["status"] == "ok"
        for s in SPLITS:
            got = rep[t]["splits"][s]
            assert {k: got[k] for k in written[t][s]} == written[t][s]
        for name, digest in rep[t]["files"].items():
            assert len(digest) == 64 and (d / t / name).is_file()
    assert set(rep["mednli"]["splits"]["train"]) >= {"items", "labels"}
    assert set(rep["radqa"]["splits"]["dev"]) >= {"items", "answerable", "unanswerable"}
    assert set(rep["clip"]["splits"]["test"]) >= {"notes", "items", "labels"}
    assert set(rep["clip"]["splits"]["train"]["labels"]) == set(CLIP_LABELS)


def test_console_scripts_on_a_fresh_folder(tmp_path, run_cli):
    d = tmp_path / "demo"
    packaged = {"CLINICAL_REPRO_PARAMS": None, "CLINICAL_REPRO_TEMPLATES": None}   # what an installed package finds
    r = run_cli("demo-data", "--out", d, "--size", "tiny", cwd=tmp_path, env=packaged)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC" in r.stdout
    r = run_cli("check-data", "--data-dir", d, cwd=tmp_path, env=packaged)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mednli: ok" in r.stdout and "radqa: ok" in r.stdout and "clip: ok" in r.stdout


def test_demo_data_is_deterministic_per_seed(tmp_path, run_main):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run_main("demo-data", "--out", tmp_path / name, "--size", "tiny", "--seed", seed)[0] == 0
    assert tree_state(tmp_path / "a") == tree_state(tmp_path / "b")
    assert tree_state(tmp_path / "a") != tree_state(tmp_path / "c")


def test_demo_data_refuses_a_file_as_out(tmp_path, run_main):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_main("demo-data", "--out", f)
    assert rc == 2 and "expected a folder" in err and f.read_text() == "x"


def test_missing_tasks_point_to_physionet(tiny_release, tmp_path, run_main):
    d = tmp_path / "data"
    shutil.copytree(tiny_release[0] / "radqa", d / "radqa")
    rc, out, _ = run_main("check-data", "--data-dir", d, "--json")
    rep = json.loads(out)
    assert rc == 0  # every present task is valid
    assert rep["radqa"]["status"] == "ok"
    assert rep["mednli"] == {**rep["mednli"], "status": "missing", "help": get_task("mednli").physionet_page}
    assert rep["clip"]["status"] == "missing" and rep["clip"]["help"] == get_task("clip").physionet_page
    rc, out, err = run_main("check-data", "--data-dir", tmp_path)   # no task at all: non-zero, said plainly
    assert rc == 1 and "No task found" in err


def test_mednli_from_the_zip_equals_the_extracted_folder(tiny_release, tmp_path):
    src = find(tiny_release[0], "mli_train_v1.jsonl").parent
    z = tmp_path / "zipped" / "mednli" / f"{src.name}.zip"
    z.parent.mkdir(parents=True)
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(src.iterdir()): zf.write(f, f"{src.name}/{f.name}")
    a = load_task(tiny_release[0], "mednli")
    b = load_task(tmp_path / "zipped", "mednli")
    assert a.splits == b.splits and list(b.files) == [z.name]


# ---- score ----------------------------------------------------------------------------------------------------

def test_score_mednli_equals_sklearn(tiny_release, tmp_path, run_main):
    gold_path = find(tiny_release[0], "mli_test_v1.jsonl")
    gold = [json.loads(l) for l in gold_path.read_text().splitlines() if l.strip()]
    rng = random.Random(7)
    pred = {g["pairID"]: (g["gold_label"] if rng.random() < 0.6 else rng.choice(MEDNLI_LABELS)) for g in gold}
    pp = tmp_path / "pred.json"
    pp.write_text(json.dumps(pred))
    rc, out, _ = run_main("score", "mednli", "--gold", gold_path, "--pred", pp, "--json")
    res = json.loads(out)
    y, yh = [g["gold_label"] for g in gold], [pred[g["pairID"]] for g in gold]
    assert rc == 0 and res["n"] == len(gold)
    assert res["accuracy"] == pytest.approx(accuracy_score(y, yh))
    assert res["macro_f1"] == pytest.approx(f1_score(y, yh, average="macro", labels=list(MEDNLI_LABELS)))


def _radqa_preds(gold_path, seed):
    "Predictions of every kind the rules distinguish: exact, partial, padded with articles/punctuation, wrong, empty."
    data = json.loads(gold_path.read_text())
    rng = random.Random(seed)
    preds, probs = {}, {}
    for art in data["data"]:
        for par in art["paragraphs"]:
            words = par["context"].split()
            for qa in par["qas"]:
                kind = rng.randrange(5)
                if qa["answers"] and kind == 0: p = qa["answers"][0]["text"]
                elif qa["answers"] and kind == 1:
                    toks = qa["answers"][0]["text"].split()
                    p = " ".join(toks[: max(1, len(toks) // 2)])
                elif qa["answers"] and kind == 2: p = "The " + qa["answers"][0]["text"].upper() + "."
                elif kind == 3: p = ""
                else: p = " ".join(rng.sample(words, min(3, len(words))))
                preds[qa["id"]] = p
                probs[qa["id"]] = round(rng.random(), 3)
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]}, preds, probs


@pytest.mark.parametrize("with_na_probs", [False, True])
def test_score_radqa_follows_the_official_squad2_rules(tiny_release, tmp_path, run_main, with_na_probs):
    gold_path = find(tiny_release[0], "test.json")
    golds, preds, probs = _radqa_preds(gold_path, seed=3)
    pp = tmp_path / "pred.json"
    pp.write_text(json.dumps(preds))
    argv = ["score", "radqa", "--gold", gold_path, "--pred", pp, "--json"]
    if with_na_probs:
        na = tmp_path / "na.json"
        na.write_text(json.dumps(probs))
        argv += ["--na-prob", na]
    rc, out, _ = run_main(*argv)
    assert rc == 0
    res = json.loads(out)
    ref = squad2_reference.evaluate(golds, preds, probs if with_na_probs else None)
    assert set(ref) <= set(res)
    for k, v in ref.items():
        assert res[k] == pytest.approx(v), k
    if with_na_probs:
        assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} <= set(res)


def test_score_radqa_applies_a_dev_tuned_threshold(tiny_release, tmp_path, run_main):
    "Negative no-answer scores (as fine-tuned QA models give): `--na-threshold T` answers \"\" above T."
    gold_path = find(tiny_release[0], "test.json")
    golds, preds, probs = _radqa_preds(gold_path, seed=4)
    scores = {q: round(4 * p - 3, 3) for q, p in probs.items()}   # in [-3, 1]
    pp, na = tmp_path / "pred.json", tmp_path / "na.json"
    pp.write_text(json.dumps(preds))
    na.write_text(json.dumps(scores))
    rc, out, _ = run_main("score", "radqa", "--gold", gold_path, "--pred", pp, "--na-prob", na,
                          "--na-threshold", "-1.5", "--json")
    assert rc == 0
    abstained = {q: "" if scores[q] > -1.5 else p for q, p in preds.items()}   # by hand
    ref = squad2_reference.evaluate(golds, abstained)
    res = json.loads(out)
    assert res["f1"] == pytest.approx(ref["f1"]) and res["exact"] == pytest.approx(ref["exact"])
    rc, _, err = run_main("score", "radqa", "--gold", gold_path, "--pred", pp, "--na-threshold", "0")
    assert rc == 2 and "--na-threshold needs --na-prob" in err


def test_score_clip_equals_sklearn(tiny_release, tmp_path, run_main):
    td = load_task(tiny_release[0], "clip")
    rng = np.random.default_rng(1)
    y = np.array([[l in r.labels for l in CLIP_LABELS] for r in td.splits["test"]], dtype=int)
    flip = rng.random(y.shape) < 0.15
    yh = np.where(flip, 1 - y, y)
    pred = {r.id: [l for l, v in zip(CLIP_LABELS, row) if v] for r, row in zip(td.splits["test"], yh)}
    pp = tmp_path / "pred.json"
    pp.write_text(json.dumps(pred))
    rc, out, _ = run_main("score", "clip", "--gold", tiny_release[0] / "clip", "--pred", pp, "--json")
    res = json.loads(out)
    assert rc == 0 and res["n"] == len(y)
    assert res["micro_f1"] == pytest.approx(f1_score(y, yh, average="micro", zero_division=0))
    assert res["macro_f1"] == pytest.approx(f1_score(y, yh, average="macro", zero_division=0))
    per = f1_score(y, yh, average=None, zero_division=0)
    assert [res["per_label_f1"][l] for l in CLIP_LABELS] == pytest.approx(list(per))


def test_score_rejects_incomplete_or_foreign_predictions(tiny_release, tmp_path, run_main):
    gold_path = find(tiny_release[0], "mli_test_v1.jsonl")
    ids = [json.loads(l)["pairID"] for l in gold_path.read_text().splitlines() if l.strip()]
    pp = tmp_path / "pred.json"
    pp.write_text(json.dumps({i: "neutral" for i in ids[1:]} | {"nope": "neutral"}))
    rc, _, err = run_main("score", "mednli", "--gold", gold_path, "--pred", pp)
    assert rc == 2 and str(pp) in err and "1 missing" in err and ids[0] in err and "nope" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = run_main("score", "mednli", "--gold", gold_path, "--pred", bad)
    assert rc == 2 and "bad.json: line 1 column 2: valid JSON" in err
    rc, _, err = run_main("score", "clip", "--gold", find(tiny_release[0], "sentence_level.csv"), "--pred", pp)
    assert rc == 2 and "expected the CLIP release folder" in err
    rc, _, err = run_main("score", "mednli", "--gold", gold_path, "--pred", pp, "--na-prob", pp)
    assert rc == 2 and "radqa only" in err


# ---- subsets ----------------------------------------------------------------------------------------------------

def test_subsets_are_shared_nested_and_stratified(tmp_path, run_main):
    d = tmp_path / "demo"
    assert run_main("demo-data", "--out", d, "--size", "demo")[0] == 0
    out = tmp_path / "subsets"
    rc, text, _ = run_main("subsets", "--data-dir", d, "--out", out)
    assert rc == 0 and "mednli" in text
    files = sorted(out.iterdir())
    assert len(files) == 3
    first = {p.name: p.read_bytes() for p in files}
    run_main("subsets", "--data-dir", d, "--out", out)            # a second model asks again: same files
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first
    for p in files:
        obj = json.loads(p.read_bytes())
        sets = [obj["subsets"][f"{fraction:g}"] for fraction in data_fractions()]
        for small, big in zip(sets, sets[1:]): assert set(small) <= set(big)
        td = load_task(d, obj["task"])
        n = len(td.notes["train"]) if obj["task"] == "clip" else len(td.splits["train"])
        assert len(sets[-1]) == n and len(set(sets[-1])) == n
        assert [len(s) for s in sets[:-1]] == [max(1, int(n * f + 1e-9)) for f in data_fractions()[:-1]]
        if obj["task"] == "mednli":
            lab = {r.id: r.label for r in td.splits["train"]}
            quarter = [lab[i] for i in sets[3]]
            share = {l: sum(r.label == l for r in td.splits["train"]) / n for l in MEDNLI_LABELS}
            for l in MEDNLI_LABELS: assert abs(quarter.count(l) - share[l] * len(quarter)) <= 1
        if obj["task"] == "radqa":
            ans = {r.id: r.answerable for r in td.splits["train"]}
            quarter = [ans[i] for i in sets[3]]
            rate = sum(ans.values()) / n
            assert abs(sum(quarter) - rate * len(quarter)) <= 1
    other = tmp_path / "subsets-seed1"
    run_main("subsets", "--data-dir", d, "--out", other, "--seed", 1)
    assert {p.name: p.read_bytes() for p in sorted(other.iterdir())} != first


# ---- the command itself: help, version, --params, --data-size ---------------------------------------------------

def command_parsers() -> dict:
    "The main parser and each command's parser, by name."
    from clinical_repro.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"clinical-repro": parser, **commands.choices}


def test_every_option_has_help_text_and_shows_its_default():
    for name, parser in command_parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            rendered = " ".join(parser._get_formatter()._format_action(action).split())
            unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
            if not unset and action.option_strings:
                assert f"default: {action.default}" in rendered, f"{name}: {rendered}"
        text = parser.format_help()
        assert "default: None" not in text and "default: False" not in text, name


def test_version_is_the_installed_package_version(capsys):
    from clinical_repro.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"clinical-repro {importlib.metadata.version('clinical_repro')}\n"


def test_top_level_help_points_at_the_readme_commands(capsys):
    from clinical_repro.cli import main
    with pytest.raises(SystemExit):
        main(["--help"])
    epilog = capsys.readouterr().out.split("start here (README.md):", 1)[1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert command in readme and command in epilog
    assert "clinical-repro run demo" in epilog


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_an_unknown_params_folder_is_a_clear_error(tmp_path, run_main, where):
    missing = tmp_path / "no-such-params"
    command = ["check-data", "--data-dir", tmp_path]
    rc, out, err = run_main(*(["--params", missing, *command] if where == "before the command"
                              else [*command, "--params", missing]))
    assert (rc, out) == (2, "")   # refused before the command ran
    assert f"parameters folder {missing} (--params or $CLINICAL_REPRO_PARAMS) does not exist" in err


FINETUNE_GRID = """
grid: p
data: {{dir: {data}}}
tasks: [mednli, radqa]
finetune: {{models: [minilm-demo], seeds: [0]}}
"""


def test_a_params_folder_with_one_file_overrides_that_file_only(tiny_release, tmp_path, run_main):
    from clinical_repro.config import default_params_dir
    task_file = yaml.safe_load((default_params_dir() / "tasks" / "mednli.yaml").read_text(encoding="utf-8"))
    task_file["train"] = {**(task_file.get("train") or {}), "warmup_ratio": 0.37}
    user = tmp_path / "my-params"
    (user / "tasks").mkdir(parents=True)
    (user / "tasks" / "mednli.yaml").write_text(yaml.safe_dump(task_file), encoding="utf-8")
    grid = tmp_path / "p.yaml"
    grid.write_text(FINETUNE_GRID.format(data=tiny_release[0]))

    def warmup(*params):
        rc, out, err = run_main(*params, "run", grid, "--reports", tmp_path / "reports", "--dry-run", "--json")
        assert rc == 0, err
        return {unit["task"]: unit["train"]["warmup_ratio"] for unit in json.loads(out)["units"]}

    shipped = warmup()
    assert shipped["mednli"] != 0.37
    assert warmup("--params", user) == {**shipped, "mednli": 0.37}   # radqa: the shipped files, as before


def test_data_size_changes_only_the_data_of_a_synthetic_grid(tmp_path, run_main):
    from clinical_repro.grid import grid_path, load_grid
    from clinical_repro.units import demo_data_dir

    def planned(*extra):
        rc, out, err = run_main("run", "demo", "--reports", tmp_path / "reports", "--dry-run", "--json", *extra)
        assert rc == 0, err
        return json.loads(out)

    full, tiny = planned(), planned("--data-size", "tiny")
    seed = load_grid(grid_path("demo")).data.synthetic.seed
    assert (full["grid"], tiny["grid"]) == ("demo", "demo-tiny")   # apart: reports/demo-tiny/
    assert Path(tiny["data_dir"]).resolve() == demo_data_dir("tiny", seed).resolve()
    assert Path(full["data_dir"]).resolve() == demo_data_dir("demo", seed).resolve()
    # the same units and settings; only what depends on the data differs (identity, and the time estimated on it)
    same = lambda units: [{k: v for k, v in unit.items() if k not in ("run_id", "status", "error", "estimate")}
                          for unit in units]
    assert same(tiny["units"]) == same(full["units"])
    assert tiny["estimate"]["total_s"] < full["estimate"]["total_s"]


def test_data_size_refuses_a_grid_on_the_releases(run_main):
    from clinical_repro.grid import grid_path
    rc, _, err = run_main("run", "paper", "--data-size", "tiny", "--dry-run")
    assert rc == 2
    assert f"--data-size tiny: {grid_path('paper')} runs on the PhysioNet releases" in err


def test_clean_frees_finished_units_checkpoints_only(run_main, tmp_path):
    "`clean` lists and removes a finished unit's checkpoint; an unfinished unit's (its resume point) and results stay."
    from clinical_repro import results
    grid = tmp_path / "reports" / "g"
    results.fake_results(grid / "results", run_id="done")
    (grid / "manifest.json").write_text("{}")
    for run_id in ("done", "running"):
        folder = grid / "results" / "work" / run_id / "checkpoint-4"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"0" * 3_000_000)
    rc, out, _ = run_main("clean", "--reports", tmp_path / "reports", "--dry-run")
    assert rc == 0 and "would free 3.0 MB in 1 item(s)" in out and "results/work/done/checkpoint-4" in out
    assert (grid / "results" / "work" / "done" / "checkpoint-4").exists()
    rc, out, _ = run_main("clean", "--reports", tmp_path / "reports")
    assert rc == 0 and "freed 3.0 MB" in out
    assert not (grid / "results" / "work" / "done" / "checkpoint-4").exists()
    assert (grid / "results" / "work" / "running" / "checkpoint-4" / "optimizer.pt").exists()
    assert (grid / "results" / "done.json").exists()
