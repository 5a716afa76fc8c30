"""The report layer: numbers a reader of Table 3 and the paired tests relies on, checked against numpy, sklearn and
hand-worked cases on small hand-made results/items files (no models, no data)."""
import json, logging, math, re, shutil
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


def nli_items(gold, pred, ids=None, clusters=None):
    "MedNLI per-item outcomes; with `clusters` (per item, its premise's number) as items files carry them now."
    ids = ids or [f"p{i}" for i in range(len(gold))]
    items = {"ids": ids, "gold": list(map(int, gold)), "pred": list(map(int, pred))}
    if clusters is not None:
        items["clusters"] = list(map(int, clusters))
    return items


def nli_unit(results_dir, run_id, model, gold, pred, seed=0, clusters=None, **fields):
    "A MedNLI unit whose accuracy is computed from `gold` and `pred`; returns the accuracy."
    accuracy = float(np.mean(np.asarray(gold) == np.asarray(pred)))
    write_unit(results_dir, run_id, "mednli", model, nli_items(gold, pred, clusters=clusters), seed=seed,
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
def test_clinical_vs_general_sign_bootstrap_p_mcnemar_descriptive_and_holm(tmp_path):
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
    qa = out[(out.b == "gen") & (out.task == "radqa")].iloc[0]
    assert nli["diff"] == pytest.approx(0.25) and nli.seeds == "0, 1"
    assert qa["diff"] == pytest.approx(0.2 - 1.0)
    # every row's p-value is the two-level bootstrap's; here no resample crosses 0: 2 / (n_boot + 1)
    assert nli.test == qa.test == "two-level bootstrap"
    assert nli.p_value == pytest.approx(2 / 201) and qa.p_value == pytest.approx(2 / 201)
    # Holm over those two p-values only (McNemar's are not in the family): both doubled
    assert out.p_value.notna().sum() == 2
    assert nli.p_holm == pytest.approx(4 / 201) and qa.p_holm == pytest.approx(4 / 201)
    assert nli.significant and qa.significant
    # McNemar per seed, shown beside (descriptive, not the p-value above): b and c summed, each seed's exact p
    assert (nli.mcnemar_b, nli.mcnemar_c) == (20, 0)  # 10 per seed, summed
    p_seed = 2 * 0.5 ** 10  # exact McNemar, b=10, c=0
    assert nli.mcnemar_p == f"{p_seed:.3g}, {p_seed:.3g}"
    missing = out[out.b == "nobody"]
    assert len(missing) == 2 and missing.reason.str.contains("nobody").all() and missing.p_holm.isna().all()


def test_pairs_are_tested_over_seeds_not_only_items(tmp_path):
    """Seeds that disagree by several points: on the items alone the clinical model looks better (the item-only
    test of before said p < .05); over seeds and items the difference is not significant, and the row says so."""
    rng = np.random.default_rng(4)
    gold, clusters = np.zeros(3000, int), np.arange(3000) // 3
    for s, (p_clin, p_gen) in enumerate([(0.84, 0.76), (0.72, 0.78), (0.80, 0.77)]):
        nli_unit(tmp_path, f"c{s}", "clin", gold, np.where(rng.random(3000) < p_clin, 0, 1), seed=s, clusters=clusters)
        nli_unit(tmp_path, f"g{s}", "gen", gold, np.where(rng.random(3000) < p_gen, 0, 1), seed=s, clusters=clusters)
    row = R.clinical_vs_general(tmp_path, R.load_results(tmp_path), [("clin", "gen")], n_boot=1000).iloc[0]
    right = lambda run_id: np.array(R.load_items(tmp_path, run_id)["pred"]) == 0
    per_item = np.mean([right(f"c{s}") for s in range(3)], 0) - np.mean([right(f"g{s}") for s in range(3)], 0)
    assert row["diff"] == pytest.approx(per_item.mean())
    assert row["diff"] > 1.96 * per_item.std() / math.sqrt(3000)     # "significant" when only items are resampled
    assert row.low < 0 < row.high and row.p_value > 0.05 and not row.significant
    assert row.covers == "over seeds and items (clusters: premise)"


def test_table3_interval_widens_with_seed_spread(tmp_path):
    rng = np.random.default_rng(5)
    gold, clusters = np.zeros(900, int), np.arange(900) // 3
    for s, p in enumerate([0.70, 0.78, 0.86]):  # seeds 8 points apart
        nli_unit(tmp_path, f"w{s}", "wobbly", gold, np.where(rng.random(900) < p, 0, 1), seed=s, clusters=clusters)
        nli_unit(tmp_path, f"s{s}", "steady", gold, np.where(rng.random(900) < 0.78, 0, 1), seed=s,
                 clusters=clusters)
    t3 = R.table3(tmp_path, R.load_results(tmp_path), n_boot=1000)
    t3 = t3[t3["mode"] == "finetune"].set_index("model")   # (the trivial baselines' rows left aside)
    width = lambda model: t3.loc[model, "mednli_accuracy_high"] - t3.loc[model, "mednli_accuracy_low"]
    seed_mean_correct = np.mean([np.array(R.load_items(tmp_path, f"w{s}")["pred"]) == 0 for s in range(3)], 0)
    item_only = 2 * 1.96 * seed_mean_correct.std() / math.sqrt(900)  # the interval of resampling items alone
    assert width("wobbly") > 2 * item_only and width("wobbly") > 2 * width("steady")
    assert (t3.mednli_accuracy_covers == "over seeds and items (clusters: premise)").all()


def _clustered_grid(tmp_path, clusters=True):
    "A grid with a 3-seed pair and a 1-unit ICL row; items files with cluster ids, or without (written before)."
    g = tmp_path / "grid"
    rng = np.random.default_rng(6)
    gold = np.zeros(90, int)
    ids = {"clusters": np.arange(90) // 3} if clusters else {}
    for s in range(3):
        nli_unit(g / "results", f"c{s}", "clin", gold, np.where(rng.random(90) < 0.9, 0, 1), seed=s, **ids)
        nli_unit(g / "results", f"g{s}", "gen", gold, np.where(rng.random(90) < 0.6, 0, 1), seed=s, **ids)
    write_unit(g / "results", "i0", "mednli", "gen", nli_items(gold, gold, **ids), mode="icl", shots=1, draw=0,
               metrics_test={"accuracy": 1.0})
    manifest = {"grid": "g", "synthetic": True, "compare": [["clin", "gen"]], "experiments": []}
    (g / "manifest.json").write_text(json.dumps(manifest))
    return g


def test_intervals_are_labelled_by_what_they_cover(tmp_path):
    g = _clustered_grid(tmp_path)
    df = R.load_results(g / "results")
    t3 = R.table3(g / "results", df, n_boot=100)
    t3 = t3[t3["mode"] != "baseline"]   # a baseline row: one fixed rule, items only
    assert sorted(t3.mednli_accuracy_covers) == ["items only (1 seed; clusters: premise)",
                                                 "over seeds and items (clusters: premise)",
                                                 "over seeds and items (clusters: premise)"]
    pairs = R.format_pairs(R.clinical_vs_general(g / "results", df, [("clin", "gen")], n_boot=100))
    assert pairs.covers.tolist() == ["over seeds and items (clusters: premise)"]
    md = R.summarize(g, n_boot=100).read_text()
    table3_part = md[md.index("## Table 3"):md.index("## Comparison with the paper")]
    assert ("Intervals cover:\n- MedNLI: over seeds and items (clusters: premise) for clin (fine-tuned), "
            "gen (fine-tuned); items only (1 seed; clusters: premise) for gen (ICL, 1-shot)") in table3_part
    assert "| 95 % interval | The interval covers |" in md and "not in the Holm family" in md


def test_items_files_without_cluster_ids_are_still_summarised(tmp_path, caplog):
    g = _clustered_grid(tmp_path, clusters=False)
    with caplog.at_level(logging.WARNING, logger="clinical_repro.report"):
        md = R.summarize(g, n_boot=100).read_text()
    assert "have no cluster ids" in caplog.text
    assert "MedNLI: over seeds and items (single items: no cluster ids)" in md
    pairs = R.clinical_vs_general(g / "results", R.load_results(g / "results"), [("clin", "gen")], n_boot=100)
    assert pairs.covers[0] == "over seeds and items (single items: no cluster ids)" and pairs.p_value[0] < 0.05


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


# ------------------------------------------------------------------ baselines, limited data, protocols, failures
def test_every_task_shows_its_trivial_baselines_on_the_models_test_items(tmp_path):
    from clinical_repro.metrics import squad_v2_scores
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 3, 90)
    train = {"items": 90, "labels": {"entailment": 10, "neutral": 50, "contradiction": 30}}   # neutral is the majority
    nli_unit(tmp_path, "n", "m", gold, gold, counts={"train_composition": train})
    has_answer = [1, 1, 0, 1, 0]
    write_unit(tmp_path, "q", "radqa", "m", {"ids": list("abcde"), "exact": [1] * 5, "f1": [1.0] * 5,
                                            "has_answer": has_answer, "answer_words": [1] * 5, "pred_empty": [0] * 5},
               metrics_test={"exact": 100.0, "f1": 100.0})
    clip_gold = rng.integers(0, 128, 60)
    clip_items = {"ids": [f"d:{i}" for i in range(60)], "gold": clip_gold.tolist(), "pred": clip_gold.tolist()}
    write_unit(tmp_path, "c", "clip", "m", clip_items, metrics_test={"micro_f1": 1.0, "macro_f1": 1.0})
    t3 = R.table3(tmp_path, R.load_results(tmp_path), n_boot=100).set_index("model")
    assert t3.loc["majority class (neutral, from train)", "mednli_accuracy"] == pytest.approx(np.mean(gold == 1))
    golds = {question: (["x"] if answerable else []) for question, answerable in zip("abcde", has_answer)}
    no_answer = squad_v2_scores(golds, dict.fromkeys("abcde", ""))
    assert t3.loc["always no answer", "radqa_f1"] == pytest.approx(no_answer["f1"] / 100)   # the official script's 40
    bits = np.array([[(v >> i) & 1 for i in range(len(CLIP_LABELS))] for v in clip_gold])
    everything = np.ones_like(bits)
    assert t3.loc["all labels", "clip_micro_f1"] == pytest.approx(f1_score(bits, everything, average="micro"))
    assert t3.loc["all labels", "clip_macro_f1"] == pytest.approx(f1_score(bits, everything, average="macro"))
    assert t3.loc["all none", "clip_micro_f1"] == 0
    assert (t3.loc["all labels", "clip_micro_f1_low"] < t3.loc["all labels", "clip_micro_f1"]
            < t3.loc["all labels", "clip_micro_f1_high"])
    shown = R.format_table3(t3.reset_index())
    assert shown.loc["m (fine-tuned)", "MedNLI acc"].startswith("**1.000")   # the best is a model, never a baseline
    assert "baseline: all labels" in shown.index and "baseline: always no answer" in shown.index


def test_limited_data_reports_every_metric_with_intervals_and_the_clip_subsets(tmp_path):
    rng = np.random.default_rng(6)
    for fraction, notes in ((0.1, 3), (1.0, 30)):
        for seed in (0, 1):
            gold, pred = rng.integers(0, 128, 80), rng.integers(0, 128, 80)
            composition = {"notes": notes, "items": 10 * notes, "no_label": notes,
                           "labels": dict.fromkeys(CLIP_LABELS, notes)}
            items = {"ids": [f"d:{i}" for i in range(80)], "gold": gold.tolist(), "pred": pred.tolist()}
            write_unit(tmp_path, f"c{fraction}{seed}", "clip", "m", items, seed=seed, fraction=fraction,
                       metrics_test=R.clip_scores_from_masks(gold, pred), counts={"train_composition": composition})
    df = R.load_results(tmp_path)
    table = R.limited_data(tmp_path, df, n_boot=100)
    models = table[table["mode"] == "finetune"]
    assert models.percent.tolist() == [10.0, 100.0]
    for column in ("clip_micro_f1", "clip_macro_f1"):   # both of the paper's CLIP metrics, each with an interval
        assert models[f"{column}_n"].tolist() == [2, 2] and models[f"{column}_low"].notna().all()
    shown = R.format_limited_data(table)
    assert list(shown.columns) == ["CLIP micro-F1", "CLIP macro-F1"]
    assert {"baseline: all none", "baseline: all labels"} <= set(shown.index)
    subsets = R.clip_subsets(tmp_path, df)
    assert subsets["% of train"].tolist() == [10.0, 100.0] and subsets["notes"].tolist() == [3, 30]
    assert subsets[CLIP_LABELS[0]].tolist() == [3, 30]


def test_generated_clip_outputs_show_the_failure_rate_and_the_worst_case(tmp_path):
    items = {"ids": ["d:0", "d:1"], "gold": [1, 2], "pred": [1, 0]}
    for seed, rate in ((0, 0.5), (1, 0.0)):
        write_unit(tmp_path, f"t{seed}", "clip", "t5", items, seed=seed, metrics_test={
            "micro_f1": 0.6, "macro_f1": 0.3, "parse_failures": {"n": 2, "failures": int(2 * rate), "rate": rate},
            "worst_case": {"micro_f1": 0.2 + seed / 10, "macro_f1": 0.1}})
    write_unit(tmp_path, "e", "mednli", "encoder", nli_items([0, 1], [0, 0]),
               metrics_test={"accuracy": 0.5, "parse_failures": 0})   # mednli_scores' count: 0 for a classifier
    table = R.generated_outputs(R.load_results(tmp_path)).set_index("row")
    assert list(table.index) == ["t5 (fine-tuned)"]   # a classifier's count of 0 is no generated output
    assert table.loc["t5 (fine-tuned)", "parse failures"] == pytest.approx(0.25)   # mean over the two seeds
    assert table.loc["t5 (fine-tuned)", "CLIP micro-F1, worst case"] == pytest.approx(0.25)
    assert table.loc["t5 (fine-tuned)", "units"] == 2


def test_summary_shows_baselines_protocols_and_parse_failures(tmp_path):
    items = {"ids": ["a", "b"], "exact": [1, 0], "f1": [1.0, 0.0], "has_answer": [1, 1], "answer_words": [1, 1],
             "pred_empty": [0, 1]}
    paper = {"description": "no-answer threshold not tuned", "n_test": 2, "test": {"exact": 0.0, "f1": 25.0}}
    write_unit(tmp_path / "results", "q", "radqa", "enc", items, metrics_test={"exact": 50.0, "f1": 50.0},
               paper_protocol=paper)
    text = R.summarize(tmp_path, n_boot=50).read_text()
    assert "baseline: always no answer" in text
    assert "| enc (fine-tuned) | RadQA F1 | .500 | .250 |" in text   # both protocols side by side, on 0-1
    assert "RadQA EM .000; RadQA F1 .250" in text                    # Table 3's protocol column
    assert "## Generated outputs: parse failures" in text


def test_icl_rows_say_how_many_exemplars_fitted_and_skip_inapplicable_protocols(tmp_path):
    for draw, kept in enumerate((2.2, 2.6)):
        nli_unit(tmp_path, f"i{draw}", "t5", [0, 1, 2, 0], [0, 1, 1, 0], mode="icl", shots=3, draw=draw,
                 exemplars_kept={"shots": 3, "test": {"prompts": 4, "mean": kept, "min": 1, "max": 3}},
                 paper_protocol={"applicable": False, "reason": "the paper has no cloze protocol"})
    df = R.load_results(tmp_path)
    shown = R.format_table3(R.table3(tmp_path, df, n_boot=50))
    assert "t5 (ICL, 3-shot, 2.4 kept on average)" in shown.index
    assert R.paper_protocol_table(df).empty and shown.loc["t5 (ICL, 3-shot, 2.4 kept on average)",
                                                          "The paper's protocol"] == "not recorded"


def test_a_baseline_that_ties_the_best_model_is_not_marked_best(tmp_path):
    abstains = {"ids": list("abc"), "exact": [0, 1, 1], "f1": [0.0, 1.0, 1.0], "has_answer": [1, 0, 0],
                "answer_words": [1, 0, 0], "pred_empty": [1, 1, 1]}   # the model says "no answer" everywhere
    write_unit(tmp_path, "q", "radqa", "m", abstains, metrics_test={"exact": 200 / 3, "f1": 200 / 3})
    shown = R.format_table3(R.table3(tmp_path, R.load_results(tmp_path), n_boot=50))
    assert shown.loc["m (fine-tuned)", "RadQA F1"].startswith("**.667")
    assert shown.loc["baseline: always no answer", "RadQA F1"].startswith(".667")   # same score, not marked


# ------------------------------------------------------------------ what a reader sees: headers, formats, figures
def icl_unit(results_dir, run_id, model, task, items, shots, score, parse_rate=0.0, **fields):
    "An ICL unit whose primary variant scored `score` (official scale); its generated variant counted parse failures."
    primary = ICL_PRIMARY[task]
    metric = dev_metric(task)
    generated = {metric: score, "parse_failures": {"n": 10, "failures": round(10 * parse_rate), "rate": parse_rate}}
    test = {primary: {metric: score}, "generate": generated} if task != "radqa" else {metric: score}
    return fake_results(results_dir, variants={primary: items}, run_id=run_id, task=task, model=model, mode="icl",
                        shots=shots, draw=0, seed=0, primary_variant=primary, metrics={"dev": {}, "test": test},
                        **fields)


def demo_like_grid(root, synthetic=True):
    """A grid shaped like the demo: a pretrained and a random-init encoder fine-tuned on MedNLI (3 seeds, 2 shares of
    train) and RadQA (one share), an LLM in context at 0/1/3 shots, the pair compared, costs as units record them."""
    g = root / "grid"
    rng = np.random.default_rng(11)
    gold, clusters = rng.integers(0, 3, 90), np.arange(90) // 3
    cost = {"wall_seconds": 38.04, "train_seconds": 24.7, "samples_per_second": 12.957, "peak_rss_mb": 1107.7,
            "oom_retries": 0, "gpu_hours": 0.0}
    for model, p_right in (("minilm-demo", 0.85), ("minilm-random-demo", 0.30)):
        for fraction in (0.25, 1.0):
            for seed in (0, 1, 2):
                pred = np.where(rng.random(90) < p_right * (0.8 + 0.2 * fraction), gold, (gold + 1) % 3)
                nli_unit(g / "results", f"{model}-{fraction}-{seed}", model, gold, pred, seed=seed, fraction=fraction,
                         clusters=clusters, cost=cost, counts={"test": 90}, synthetic=synthetic)
        qa = {"ids": list("abcdef"), "exact": [1, 0, 1, 0, 1, 0], "f1": [1.0, 0.5, 1.0, 0.0, 1.0, 0.2],
              "has_answer": [1] * 6, "answer_words": [3] * 6, "pred_empty": [0] * 6, "clusters": [0, 0, 1, 1, 2, 2]}
        write_unit(g / "results", f"{model}-qa", "radqa", model, qa, metrics_test={"exact": 50.0, "f1": 61.7},
                   cost=cost, counts={"test": 6}, synthetic=synthetic)
    for shots, rate in ((0, 1.0), (1, 0.5), (3, 1 / 6)):
        pred = np.where(rng.random(90) < 0.4, gold, -1)
        icl_unit(g / "results", f"llm-{shots}", "smollm2-demo", "mednli", nli_items(gold, pred, clusters=clusters),
                 shots, float(np.mean(pred == gold)), rate, synthetic_demo=synthetic,
                 cost={"wall_seconds": 6.43}, counts={"test": 90})
    manifest = {"grid": "g", "synthetic": synthetic, "compare": [["minilm-demo", "minilm-random-demo"]],
                "experiments": []}
    (g / "manifest.json").write_text(json.dumps(manifest))
    return g


def markdown_tables(md:str) -> list[tuple[list[str], list[list[str]]]]:
    "Every pipe table of a Markdown text: (header, rows of cells)."
    tables, lines = [], md.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("|") and k + 1 < len(lines) and lines[k + 1].startswith("|---"):
            cells = lambda text: [cell.strip() for cell in text.strip().strip("|").split(" | ")]
            body = [cells(row) for row in lines[k + 2:] if row.startswith("|")]
            end = next((i for i, row in enumerate(lines[k + 2:]) if not row.startswith("|")), len(body))
            tables.append((cells(line), body[:end]))
    return tables


NUMBER = r"^[+-]?(\d+|\d*\.\d+)$"


def test_summary_tables_have_human_headers_one_format_per_column_and_integer_counts(tmp_path):
    g = demo_like_grid(tmp_path)
    md = R.summarize(g, n_boot=100).read_text()
    tables = markdown_tables(md)
    assert len(tables) >= 8
    for header, rows in tables:
        snake = [name for name in header if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", name)]
        assert not snake, f"implementation names as headers: {snake} in {header}"
        for position, name in enumerate(header):
            cells = [row[position] for row in rows if position < len(row)]
            numbers = [cell for cell in cells if re.fullmatch(NUMBER, cell)]
            decimals = {len(cell.split(".")[1]) if "." in cell else 0 for cell in numbers}
            assert len(decimals) <= 1, f"column {name!r} mixes formats: {numbers}"
            if name in ("Units", "Test items", "Peak memory (MB)", "Out-of-memory retries", "Steps to best"):
                assert all(re.fullmatch(r"\d+", cell) for cell in cells if cell != "—"), (name, cells)
    failures = next(rows for header, rows in tables if "Parse failures (%)" in header)
    assert sorted(row[3] for row in failures) == ["100.0", "16.7", "50.0"]   # rates as percentages, one decimal
    cost = next((header, rows) for header, rows in tables if "Wall time per unit (s)" in header)
    assert cost[1][0][cost[0].index("Peak memory (MB)")] == "1108" and "wall_s_mean" not in md


def test_the_top_sentence_says_what_a_synthetic_demo_shows_and_cannot(tmp_path):
    demo = R.summarize(demo_like_grid(tmp_path / "demo"), n_boot=200).read_text()
    top = demo.split("\n## ")[0]
    assert "This demo shows the pipeline end to end on synthetic data" in top
    assert "minilm-demo (encoder) beats the trivial baselines on every task" in top   # read from the results
    assert "the paired test finds minilm-demo ahead of minilm-random-demo on MedNLI" in top
    assert "general-domain models" in top and "smollm2-demo" in top            # from the registry's domains
    assert "cannot show anything about clinical vs general models" in top and "the paper's numbers" in top
    real = R.summarize(demo_like_grid(tmp_path / "real", synthetic=False), n_boot=50).read_text()
    assert "This demo shows" not in real and "cannot show" not in real


def test_a_panel_with_a_single_point_is_a_table(tmp_path):
    g = demo_like_grid(tmp_path)
    df = R.load_results(g / "results")
    figure = R.plot_limited_data(df)
    mednli, radqa = figure.axes[:2]
    assert mednli.lines and not mednli.tables                       # two shares of train: a curve
    assert radqa.tables and not radqa.lines and not radqa.collections  # one share: its numbers as a table
    plt.close(figure)
    figure = R.plot_cost_vs_score(df[(df.task != "radqa") | (df.model == "minilm-demo")])   # RadQA: one unit
    assert figure.axes[1].tables and not figure.axes[1].collections
    plt.close(figure)


def _plotted_y(ax) -> np.ndarray:
    "The data y of every line, whisker and band drawn on `ax`."
    ys = [np.asarray(line.get_ydata(), float) for line in ax.lines]
    ys += [path.vertices[:, 1] for collection in ax.collections for path in collection.get_paths()]
    ys = np.concatenate(ys) if ys else np.array([])
    return ys[np.isfinite(ys)]


def test_whiskers_and_bands_stay_within_the_metric_range(tmp_path):
    gold = np.zeros(30, int)
    for fraction in (0.5, 1.0):
        for seed, right in enumerate((30, 30, 8)):   # accuracies 1, 1, .27: mean + sd above 1, mean - sd fine
            nli_unit(tmp_path, f"u{fraction}{seed}", "m", gold, np.where(np.arange(30) < right, 0, 1), seed=seed,
                     fraction=fraction)
    nli_unit(tmp_path, "other", "n", gold, gold, seed=0)
    df = R.load_results(tmp_path)
    for plot in (R.plot_icl_vs_finetune, R.plot_limited_data):
        figure = plot(df)
        ys = _plotted_y(figure.axes[0])
        assert ys.size and ys.min() >= 0 and ys.max() <= 1, (plot.__name__, ys.max())
        plt.close(figure)


def test_zero_bars_are_marked_and_missing_ones_say_na(tmp_path):
    gold = np.zeros(20, int)
    nli_unit(tmp_path, "a", "good", gold, gold)
    nli_unit(tmp_path, "z", "zero", gold, np.ones(20, int))                  # accuracy 0: a bar of height 0
    qa = {"ids": list("ab"), "exact": [1, 0], "f1": [1.0, 0.0], "has_answer": [1, 1], "answer_words": [1, 1],
          "pred_empty": [0, 0]}
    write_unit(tmp_path, "q", "radqa", "good", qa, metrics_test={"exact": 50.0, "f1": 50.0})
    icl_unit(tmp_path, "i", "llm", "radqa", qa, 1, 50.0)                     # "zero" has no RadQA unit: n/a
    figure = R.plot_icl_vs_finetune(R.load_results(tmp_path))
    mednli, radqa = figure.axes[:2]
    assert ".000" in [text.get_text() for text in mednli.texts]
    assert "n/a" in [text.get_text() for text in radqa.texts]
    plt.close(figure)


def test_experiment_report_tables_have_human_headers_and_integer_counts(tmp_path):
    g = demo_like_grid(tmp_path)
    df = R.load_results(g / "results")
    ok = df[(df.task == "mednli") & (df.model == "minilm-demo")]
    units = markdown_tables(R.reader_md(R.units_table(ok)))[0]
    assert {"Test accuracy", "Test items", "Wall time (s)", "Training time (s)"} <= set(units[0])
    assert {row[units[0].index("Test items")] for row in units[1]} == {"90"}
    cost = markdown_tables(R.reader_md(R.cost_table(ok)))[0]
    row = dict(zip(*cost[0:1], cost[1][0]))
    assert (row["Units"], row["Peak memory (MB)"], row["Out-of-memory retries"]) == ("6", "1108", "0")
    assert row["Wall time per unit (s)"] == "38.0" and "GPU-hours, all units" not in row   # CPU: no GPU column


def test_a_row_scored_on_fewer_test_items_says_how_many(tmp_path):
    "ICL limited to 30 of 90 test pairs: Table 3 and the fine-tuning vs ICL view say '(n = 30)' on that row only."
    rng = np.random.default_rng(11)
    gold = rng.integers(0, 3, 90)
    nli_unit(tmp_path, "f", "enc", gold, gold, counts={"test": 90})
    nli_unit(tmp_path, "i", "dec", gold[:30], rng.integers(0, 3, 30), mode="icl", shots=1, draw=0,
             counts={"test": 30})
    df = R.load_results(tmp_path)
    shown = R.format_table3(R.table3(tmp_path, df, n_boot=50))
    assert shown.loc["dec (ICL, 1-shot)", "MedNLI acc"].endswith("(n = 30)")
    assert "(n = " not in shown.loc["enc (fine-tuned)", "MedNLI acc"]
    view = R.finetune_vs_icl(df)
    assert view.loc["MedNLI acc", "dec, ICL 1-shot"].endswith(" (n = 30)")
    assert "(n = " not in view.loc["MedNLI acc", "enc, fine-tuned"]


# ------------------------------------------------------------------ LLMs in context: matched pairs, the paper's rows
def test_llm_pairs_match_seed_and_draw_per_shot_count_and_holm_over_their_own_family(tmp_path):
    """MedNLI, 40 items: per (seed, draw) the medical model is right on 30 and its base on 20 (1 shot); a draw only the
    medical model ran is left out; at 3 shots only the medical model ran, and the row says so."""
    gold = np.zeros(40, int)
    med, gen = np.where(np.arange(40) < 30, 0, 1), np.where(np.arange(40) < 20, 0, 1)
    for draw in (0, 1):
        nli_unit(tmp_path, f"m{draw}", "med", gold, med, mode="icl", shots=1, draw=draw)
        nli_unit(tmp_path, f"g{draw}", "gen", gold, gen, mode="icl", shots=1, draw=draw)
    nli_unit(tmp_path, "m2", "med", gold, gold, mode="icl", shots=1, draw=2)    # no partner: not in the test
    nli_unit(tmp_path, "m3", "med", gold, med, mode="icl", shots=3, draw=0)
    nli_unit(tmp_path, "ft", "med", gold, gold, seed=0)                        # fine-tuned: not an in-context unit
    out = R.llm_pairs(tmp_path, R.load_results(tmp_path), [("med", "gen")], n_boot=200)
    one, three = out[out.shots == 1].iloc[0], out[out.shots == 3].iloc[0]
    assert (one.a, one.b, one.task, one.seeds, one.n_items) == ("med", "gen", "mednli", "0/0, 0/1", 40)
    assert one["diff"] == pytest.approx(0.75 - 0.5) and one.a_mean == pytest.approx(0.75)
    assert one.p_value == pytest.approx(2 / 201) and one.p_holm == pytest.approx(2 / 201) and one.significant
    assert math.isnan(three.p_value) and three.reason == "no finished in-context units at 3 shots for gen"
    assert (one.mcnemar_b, one.mcnemar_c) == (20, 0)                          # 10 per draw, summed


def test_matched_llm_pairs_come_from_the_registry_bases_of_models_run_in_context(tmp_path):
    gold = np.zeros(4, int)
    for model in ("biomistral-7b", "mistral-7b-instruct-v0-1", "medgemma-4b-it"):
        nli_unit(tmp_path, model, model, gold, gold, mode="icl", shots=1, draw=0)
    nli_unit(tmp_path, "g3", "gemma-3-4b-it", gold, gold, seed=0)   # fine-tuned only: MedGemma 4B has no partner
    assert R.matched_llm_pairs(R.load_results(tmp_path)) == [("biomistral-7b", "mistral-7b-instruct-v0-1")]


def test_llms_in_context_sits_beside_the_papers_published_icl_rows(tmp_path):
    gold = np.zeros(20, int)
    for model in ("biomistral-7b", "mistral-7b-instruct-v0-1"):
        nli_unit(tmp_path / "results", model, model, gold, np.where(np.arange(20) < 15, 0, 1), mode="icl", shots=3,
                 draw=0)
    text = R.summarize(tmp_path, n_boot=50).read_text()
    section = text.split(f"## {R.LLM_SECTION}")[1].split("\n## ")[0]
    header, rows = markdown_tables(section)[0]
    table = {row[0]: dict(zip(header, row)) for row in rows}
    assert table["biomistral-7b (ICL, 3-shot)"]["Matched with"] == "mistral-7b-instruct-v0-1"
    assert table["biomistral-7b (ICL, 3-shot)"]["Domain"] == "biomedical"
    assert table["biomistral-7b (ICL, 3-shot)"]["MedNLI acc"].startswith(".750")
    # Lehman et al. 2023, Table 3 (REFERENCE.md): Flan-T5-XXL .808 / .602 / .178, GPT-3 .805 / .619 / .146
    assert [table["Flan-T5-XXL (ICL, published)"][c] for c in ("MedNLI acc", "RadQA F1", "CLIP macro-F1")] == [
        ".808", ".602", ".178"]
    assert [table["GPT-3 (ICL, published)"][c] for c in ("MedNLI acc", "RadQA F1", "CLIP macro-F1")] == [
        ".805", ".619", ".146"]
    pairs_header, pairs = markdown_tables(section)[1]
    first_pair = dict(zip(pairs_header, pairs[0]))
    assert first_pair["Shots"] == "3" and first_pair["Difference (A − B)"] and first_pair["Seed / draw"] == "0/0"


def test_generated_radqa_answers_show_how_many_are_quoted_verbatim(tmp_path):
    items = {"ids": ["a", "b"], "exact": [1, 0], "f1": [1.0, 0.0], "has_answer": [1, 1], "answer_words": [1, 1],
             "pred_empty": [0, 0]}
    for draw, verbatim in enumerate((1, 2)):
        rate = {"answers": 2, "verbatim": verbatim, "rate": verbatim / 2, "rate_normalized": verbatim / 2}
        write_unit(tmp_path, f"q{draw}", "radqa", "llm", items, mode="icl", shots=1, draw=draw,
                   metrics_test={"exact": 50.0, "f1": 50.0, "verbatim_span_rate": rate})
    row = R.generated_outputs(R.load_results(tmp_path)).iloc[0]
    assert row["verbatim answers"] == pytest.approx(0.75) and row.units == 2
    assert "parse failures" not in row   # RadQA has none to count: the column is not shown


def test_a_published_remote_row_is_validated_like_the_others(tmp_path):
    params = params_copy(tmp_path, lambda d: d["remote"]["gpt-3"]["scores"]["mednli"].update(accuracy=80.5))
    with pytest.raises(DataError, match=r"remote\.gpt-3\.scores\.mednli\.accuracy"):
        R.paper_icl_results(params)


def test_generated_outputs_show_the_prompt_layouts_the_units_read(tmp_path):
    items = {"ids": ["a", "b"], "exact": [1, 0], "f1": [1.0, 0.0], "has_answer": [1, 1], "answer_words": [1, 1],
             "pred_empty": [0, 0]}
    rate = {"answers": 2, "verbatim": 1, "rate": 0.5, "rate_normalized": 0.5}
    for draw, layout in enumerate(("chat_inline", "chat_turns", "chat_turns")):   # chosen on dev per unit
        write_unit(tmp_path, f"q{draw}", "radqa", "llm", items, mode="icl", shots=1, draw=draw, prompt_layout=layout,
                   metrics_test={"exact": 50.0, "f1": 50.0, "verbatim_span_rate": rate})
    write_unit(tmp_path, "q9", "radqa", "other", items, mode="icl", shots=1, prompt_layout="chat_inline",
               metrics_test={"exact": 50.0, "f1": 50.0, "verbatim_span_rate": rate})
    clip = {"ids": ["d:0", "d:1"], "gold": [1, 2], "pred": [1, 0]}
    failures = {"n": 2, "failures": 1, "rate": 0.5}
    write_unit(tmp_path, "c", "clip", "llm", clip, mode="icl", shots=1, metrics_test={"micro_f1": 0.6, "macro_f1": 0.3},
               prompt_layout={"per_label": "chat_turns", "list": "chat_inline"})
    record = json.loads((tmp_path/"c.json").read_text())
    record["metrics"]["test"]["list"] = {"micro_f1": 0.2, "macro_f1": 0.1, "parse_failures": failures}
    (tmp_path/"c.json").write_text(json.dumps(record))
    table = R.generated_outputs(R.load_results(tmp_path)).set_index(["row", "task"])
    assert table.columns[:2].tolist() == ["variant", "prompt layout"]
    assert table.loc[("llm (ICL, 1-shot)", "radqa"), "prompt layout"] == "chat_turns 2, chat_inline 1"
    assert table.loc[("other (ICL, 1-shot)", "radqa"), "prompt layout"] == "chat_inline"
    assert table.loc[("llm (ICL, 1-shot)", "clip"), "prompt layout"] == "chat_inline"   # the list variant's
