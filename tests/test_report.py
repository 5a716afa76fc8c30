"""The report layer: numbers a reader of Table 3 and the paired tests relies on, checked against numpy, sklearn and
hand-worked cases on small hand-made results/items files (no models, no data)."""
import json, logging, math, shutil
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score

from conftest import PARAMS
from clinical_repro import report as R
from clinical_repro.core import DataError
from clinical_repro.results import fake_results
from clinical_repro.tasks import CLIP_LABELS, dev_metric

ICL_PRIMARY = {"mednli": "rank", "radqa": "answer", "clip": "per_label"}  # the primary variants icl writes


# ------------------------------------------------------------------ units: results + items files (results.fake_results)
def write_unit(results_dir, run_id, task, model, items, *, metrics_test, mode="finetune", synthetic=False, **fields):
    "A unit that reported `metrics_test` (official scales) with per-item outcomes `items`."
    primary = "finetune" if mode == "finetune" else ICL_PRIMARY[task]
    test = {primary: metrics_test} if mode == "icl" and task != "radqa" else metrics_test
    selection = dev_metric(task)
    return fake_results(results_dir, variants={primary: items}, run_id=run_id, task=task, model=model, mode=mode,
                        metrics={"dev": {}, "test": test}, dev_metric=selection, synthetic_demo=synthetic,
                        dev_history=[{"epoch": 1.0, "step": 5, "train_seconds": 1.0, selection: 0.5}], **fields)


def nli_items(gold, pred, ids=None):
    ids = ids or [f"p{i}" for i in range(len(gold))]
    return {"ids": ids, "gold": list(map(int, gold)), "pred": list(map(int, pred))}


def nli_unit(results_dir, run_id, model, gold, pred, seed=0, **fields):
    "A MedNLI unit whose accuracy is computed from `gold` and `pred`; returns the accuracy."
    accuracy = float(np.mean(np.asarray(gold) == np.asarray(pred)))
    write_unit(results_dir, run_id, "mednli", model, nli_items(gold, pred), seed=seed,
               metrics_test={"accuracy": accuracy}, **fields)
    return accuracy


# ------------------------------------------------------------------ Table 3
def test_table3_mean_sd_match_numpy_and_ci_contains_point(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 400)
    accs = []
    for s, p_right in enumerate([0.70, 0.78, 0.74]):
        pred = np.where(rng.random(400) < p_right, gold, (gold + 1) % 3)
        accs.append(nli_unit(tmp_path, f"u{s}", "m", gold, pred, seed=s))
    t3 = R.table3(tmp_path, R.load_results(tmp_path), n_boot=300)
    row = t3.iloc[0]
    assert row["mednli_accuracy"] == pytest.approx(np.mean(accs))
    assert row["mednli_accuracy_sd"] == pytest.approx(np.std(accs, ddof=1))
    assert row["mednli_accuracy_n"] == 3
    assert row["mednli_accuracy_low"] < np.mean(accs) < row["mednli_accuracy_high"]
    assert math.isnan(row["radqa_f1"])  # a task the row did not run


def test_ci_is_narrower_with_more_items(tmp_path):
    widths = []
    for n in (100, 1600):
        d = tmp_path / str(n)
        gold = np.zeros(n, int)
        pred = np.where(np.arange(n) % 4 == 0, 1, 0)  # exactly 75 % right at both sizes
        nli_unit(d, "u0", "m", gold, pred)
        r = R.table3(d, R.load_results(d), n_boot=300).iloc[0]
        assert r["mednli_accuracy_low"] <= 0.75 <= r["mednli_accuracy_high"]
        widths.append(r["mednli_accuracy_high"] - r["mednli_accuracy_low"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(16) = 1/4 of the width


def test_radqa_is_on_a_0_1_scale(tmp_path):
    items = {"ids": ["a", "b", "c", "d"], "exact": [1, 0, 1, 0], "f1": [1.0, 0.5, 1.0, 0.0],
             "has_answer": [1, 1, 0, 1], "answer_words": [2, 12, 0, 40], "pred_empty": [0, 0, 1, 1]}
    write_unit(tmp_path, "q", "radqa", "m", items, metrics_test={"exact": 50.0, "f1": 62.5})
    df = R.load_results(tmp_path)
    assert (df.exact[0], df.f1[0]) == (0.5, 0.625)
    qa = R.qa_breakdown(tmp_path, df).set_index("group")
    assert qa.loc["HasAns", "f1"] == pytest.approx(0.5)  # (1 + .5 + 0) / 3
    assert qa.loc["NoAns", "exact"] == 1.0
    assert qa.loc["HasAns, answer >30 words", "no_answer_rate"] == 1.0


def test_clip_macro_f1_from_masks_equals_sklearn(tmp_path):
    rng = np.random.default_rng(3)
    gold, pred = rng.integers(0, 128, 250), rng.integers(0, 128, 250)
    bits = lambda m: np.array([[(v >> i) & 1 for i in range(len(CLIP_LABELS))] for v in m])
    want_macro = f1_score(bits(gold), bits(pred), average="macro", zero_division=0)
    want_micro = f1_score(bits(gold), bits(pred), average="micro", zero_division=0)
    assert R.clip_scores_from_masks(gold, pred)["macro_f1"] == pytest.approx(want_macro)
    items = {"ids": [f"d:{i}" for i in range(250)], "gold": gold.tolist(), "pred": pred.tolist()}
    write_unit(tmp_path, "c", "clip", "m", items,
               metrics_test={"micro_f1": want_micro, "macro_f1": want_macro})
    t3 = R.table3(tmp_path, R.load_results(tmp_path), n_boot=200).iloc[0]
    assert t3["clip_macro_f1_low"] < want_macro < t3["clip_macro_f1_high"]
    pl = R.per_label_f1(tmp_path, R.load_results(tmp_path))
    assert pl.f1.tolist() == pytest.approx(f1_score(bits(gold), bits(pred), average=None, zero_division=0).tolist())


# ------------------------------------------------------------------ the paper's numbers (params/paper_results.yaml)
def params_copy(tmp_path, edit):
    "A params/ folder with defaults.yaml, the task files and an edited paper_results.yaml."
    folder = tmp_path / "params"
    shutil.copytree(PARAMS / "tasks", folder / "tasks")
    shutil.copy(PARAMS / "defaults.yaml", folder)
    published = yaml.safe_load((PARAMS / "paper_results.yaml").read_text())
    edit(published)
    (folder / "paper_results.yaml").write_text(yaml.safe_dump(published))
    return folder


def test_comparison_with_the_paper_reads_params(tmp_path, monkeypatch):
    row = {"model": "gatortron", "mode": "finetune", "shots": None, "radqa_f1": 0.70}  # a row of table3
    compared = R.compare_with_paper(pd.DataFrame([row]))
    assert compared[["paper_name", "metric", "paper", "source"]].values.tolist() == [
        ["GatorTron", "RadQA F1", 0.759, "Table 3"]]
    folder = params_copy(tmp_path, lambda p: p["models"]["gatortron"]["scores"]["radqa"].update(f1=0.5))
    monkeypatch.setenv("CLINICAL_REPRO_PARAMS", str(folder))
    assert R.compare_with_paper(pd.DataFrame([row])).difference[0] == pytest.approx(0.2)


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["models"]["t5-base"].update(seeds=3), "models.t5-base.seeds"),
    (lambda p: p.update(tables=[]), "tables"),
    (lambda p: p["models"]["t5-base"]["scores"]["mednli"].update(f1=0.8), "models.t5-base.scores.mednli.f1"),
    (lambda p: p["models"]["t5-base"]["scores"]["radqa"].update(f1=66.2), "models.t5-base.scores.radqa.f1"),
])
def test_paper_results_are_validated_strictly(tmp_path, edit, key):
    folder = params_copy(tmp_path, edit)
    with pytest.raises(DataError) as error:
        R.paper_results(folder)
    assert "paper_results.yaml" in str(error.value) and key in str(error.value)


# ------------------------------------------------------------------ clinical vs general
def test_clinical_vs_general_sign_mcnemar_counts_and_holm(tmp_path):
    # 40 items, seed-matched; per seed the clinical model is right on 30, the general one on 20:
    # items 0-19 both right, 20-29 only clinical (b = 10), 30-39 neither -> c = 0.
    gold = np.zeros(40, int)
    clin = np.where(np.arange(40) < 30, 0, 1)
    gen = np.where(np.arange(40) < 20, 0, 1)
    for s in (0, 1):
        nli_unit(tmp_path, f"c{s}", "clin", gold, clin, seed=s)
        nli_unit(tmp_path, f"g{s}", "gen", gold, gen, seed=s)
    nli_unit(tmp_path, "g7", "gen", gold, gen, seed=7)  # no clinical partner: not used
    # a second task for a second row (RadQA, general better), so Holm has two p-values to adjust
    for s in (0, 1):
        base = {"ids": list("abcdef"), "has_answer": [1] * 6, "answer_words": [3] * 6, "pred_empty": [0] * 6}
        write_unit(tmp_path, f"qc{s}", "radqa", "clin", {**base, "exact": [0] * 6, "f1": [0.2] * 6}, seed=s,
                   metrics_test={"exact": 0.0, "f1": 20.0})
        write_unit(tmp_path, f"qg{s}", "radqa", "gen", {**base, "exact": [1] * 6, "f1": [1.0] * 6}, seed=s,
                   metrics_test={"exact": 100.0, "f1": 100.0})
    out = R.clinical_vs_general(tmp_path, R.load_results(tmp_path), [("clin", "gen"), ("clin", "nobody")], n_boot=200)
    nli = out[(out.a == "clin") & (out.b == "gen") & (out.task == "mednli")].iloc[0]
    assert nli["diff"] == pytest.approx(0.25) and nli.seeds == "0, 1"
    assert (nli.mcnemar_b, nli.mcnemar_c) == (20, 0)  # 10 per seed, summed
    p_seed = 2 * 0.5 ** 10  # exact McNemar, b=10, c=0, per seed: the max over identical seeds
    assert nli.p_value == pytest.approx(p_seed)
    qa = out[(out.b == "gen") & (out.task == "radqa")].iloc[0]
    assert qa["diff"] == pytest.approx(0.2 - 1.0) and qa.test == "paired bootstrap"
    # Holm over the two rows that have p-values: the smaller doubled, the larger kept (but not below the first)
    assert out.p_value.notna().sum() == 2 and nli.p_value < qa.p_value
    assert nli.p_holm == pytest.approx(2 * nli.p_value)
    assert qa.p_holm == pytest.approx(max(qa.p_value, 2 * nli.p_value))
    assert nli.significant and qa.significant
    missing = out[out.b == "nobody"]
    assert len(missing) == 2 and missing.reason.str.contains("nobody").all() and missing.p_holm.isna().all()


def test_unmatched_seeds_are_reported_not_dropped(tmp_path):
    gold = np.zeros(10, int)
    nli_unit(tmp_path, "c0", "clin", gold, gold, seed=0)
    nli_unit(tmp_path, "g1", "gen", gold, gold, seed=1)
    out = R.clinical_vs_general(tmp_path, R.load_results(tmp_path), [("clin", "gen")], n_boot=50)
    assert len(out) == 1 and "no matched seeds" in out.reason[0] and not out.significant[0]


# ------------------------------------------------------------------ robustness, banner, files
def test_corrupt_results_file_is_skipped_with_a_warning(tmp_path, caplog):
    nli_unit(tmp_path, "ok1", "m", [0, 1], [0, 1])
    (tmp_path / "half.json").write_text('{"run_id": "x", "sta')
    (tmp_path / "list.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="clinical_repro.report"):
        df = R.load_results(tmp_path)
    assert df.run_id.tolist() == ["ok1"]
    assert "half.json" in caplog.text and "list.json" in caplog.text


def test_icl_headline_comes_from_the_primary_variant(tmp_path):
    write_unit(tmp_path, "i", "mednli", "t5", nli_items([0, 1, 2, 0], [0, 1, -1, 1]), mode="icl", shots=1, draw=0,
               metrics_test={"accuracy": 0.5})
    df = R.load_results(tmp_path)
    assert df.accuracy[0] == 0.5 and df["mode"][0] == "icl"
    cm = R.confusion_matrix(tmp_path, df)
    assert cm.loc["neutral", "neutral"] == 1 and cm.loc["contradiction", "parse failure"] == 1


def _grid(tmp_path, synthetic):
    g = tmp_path / "grid"
    gold = np.zeros(20, int)
    nli_unit(g / "results", "u", "m", gold, np.where(np.arange(20) < 15, 0, 1), synthetic=synthetic)
    manifest = {"grid": "g", "synthetic": synthetic, "compare": [], "experiments": []}
    (g / "manifest.json").write_text(json.dumps(manifest))
    return g


@pytest.mark.parametrize("synthetic", [True, False])
def test_summary_banner_only_for_synthetic_units(tmp_path, synthetic):
    g = _grid(tmp_path, synthetic)
    md = R.summary_markdown(g, {"Results": R.load_results(g / "results")[["model", "accuracy"]]})
    assert ("not a reproduction of Lehman et al. 2023" in md) is synthetic
    if synthetic:
        assert md.index("not a reproduction") < md.index("## Results")  # the banner comes first


def test_save_figure_and_summary_files(tmp_path):
    g = _grid(tmp_path, True)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    p = R.save_figure(fig, g / "figures", "demo_plot")
    plt.close(fig)
    assert p == g / "figures" / "demo_plot.png" and p.stat().st_size > 0
    summary = R.summarize(g, n_boot=50)
    md = summary.read_text()
    for name in ("limited_data", "icl_vs_finetune", "cost_vs_score"):
        assert (g / "figures" / f"{name}.png").is_file() and f"(figures/{name}.png)" in md
    assert "## Provenance" in md and "## Table 3" in md
