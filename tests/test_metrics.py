"""Metrics checked against independent references: scikit-learn, SciPy, and cases worked by hand from the published \
rules."""
import inspect, math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from clinical_repro.core import UserError
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS
from clinical_repro.metrics import (
    apply_no_answer_threshold, apply_thresholds, exact_match, holm, mcnemar, mednli_scores,
    multilabel_auc, multilabel_scores, normalize_answer, squad_v2_scores, token_f1,
    tune_no_answer_threshold, tune_thresholds,
)

# ---------------------------------------------------------------- MedNLI

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mednli_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold = list(rng.choice(MEDNLI_LABELS, 400))
    pred = [None if r < 0.05 else "maybe" if r < 0.1 else str(l)
            for r, l in zip(rng.random(400), rng.choice(MEDNLI_LABELS, 400))]
    # scikit-learn sees an unparsed answer as a label outside `labels`: wrong, and no class's false positive
    sk_pred = ["<unparsed>" if p not in MEDNLI_LABELS else p for p in pred]
    s = mednli_scores(gold, pred)
    assert s["accuracy"] == pytest.approx(accuracy_score(gold, sk_pred))
    assert s["macro_f1"] == pytest.approx(f1_score(gold, sk_pred, labels=list(MEDNLI_LABELS), average="macro"))
    assert s["n"] == 400
    assert s["parse_failures"] == sum(p not in MEDNLI_LABELS for p in pred)
    assert sum(map(sum, s["confusion"])) == 400 - s["parse_failures"]


def test_mednli_confusion_and_parse_failures_by_hand():
    gold = ["entailment", "entailment", "neutral", "contradiction", "contradiction"]
    pred = ["entailment", None, "contradiction", "contradiction", "Contradiction."]
    s = mednli_scores(gold, pred)
    # rows gold, columns predicted, order entailment/neutral/contradiction; the two unparsed answers are in no cell
    assert s["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert s["parse_failures"] == 2
    assert s["accuracy"] == pytest.approx(2 / 5)
    # entailment: P=1/1 R=1/2 -> 2/3; neutral: 0; contradiction: P=1/2 R=1/2 -> 1/2
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)


def test_mednli_never_maps_failures_to_a_default_class():
    s = mednli_scores(["neutral"] * 4, [None] * 4)
    assert s["accuracy"] == 0 and s["macro_f1"] == 0 and s["parse_failures"] == 4


@pytest.mark.parametrize("gold,pred,match", [
    (["neutral", "neutral"], ["neutral"], "as many predictions as gold labels"),
    (["Neutral"], ["neutral"], "gold labels must be one of"),
    ([], [], "at least one gold label"),
])
def test_mednli_errors(gold, pred, match):
    with pytest.raises(UserError, match=match): mednli_scores(gold, pred)

# ---------------------------------------------------------------- RadQA (SQuAD 2.0 rules)

@pytest.mark.parametrize("raw,norm", [
    ("The Left Pleural Effusion.", "left pleural effusion"),
    ("  an   effusion,  a  day ", "effusion day"),
    ("theory of thermal anatomy", "theory of thermal anatomy"),  # articles only as whole words
    ("pleural-effusion (small)", "pleuraleffusion small"),     # punctuation deleted, not replaced by a space
    ("A", ""),
    ("5.2 cm", "52 cm"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("Small left effusion.", "small left  effusion") == 1
    assert exact_match("left effusion", "small left effusion") == 0
    assert exact_match("", "the") == 1  # "the" normalises to nothing


def test_token_f1_by_hand():
    # gold 4 tokens, pred 2 tokens, both in gold: P = 2/2, R = 2/4, F1 = 2*1*0.5/1.5 = 2/3
    assert token_f1("small left pleural effusion", "left effusion") == pytest.approx(2 / 3)
    # bag of tokens: gold {effusion: 2}, pred {effusion: 1}: common 1, P = 1, R = 1/2 -> 2/3
    assert token_f1("effusion effusion", "effusion") == pytest.approx(2 / 3)
    # "The" is dropped: gold [right, lung], pred [right, upper, lung]: P = 2/3, R = 1 -> 0.8
    assert token_f1("The right lung", "right upper lung") == pytest.approx(0.8)
    assert token_f1("pneumothorax", "effusion") == 0
    assert token_f1("", "") == 1 and token_f1("a", "") == 1
    assert token_f1("effusion", "") == 0 and token_f1("", "effusion") == 0


def test_max_over_golds():
    golds = {"q": ["right effusion", "small left pleural effusion", "Left effusion"]}
    s = squad_v2_scores(golds, {"q": "left effusion"})
    assert s["exact"] == 100.0  # third gold matches after normalisation
    # without the third gold: F1s are 1/2 (P=R=1/2) and 2/3 -> max 2/3; EM 0
    s = squad_v2_scores({"q": golds["q"][:2]}, {"q": "left effusion"})
    assert s["exact"] == 0.0 and s["f1"] == pytest.approx(100 * 2 / 3)


def test_unanswerable_questions():
    golds = {"n1": [], "n2": [], "n3": []}
    s = squad_v2_scores(golds, {"n1": "", "n2": "effusion", "n3": "The."})
    # n1 right; n2 wrong; n3's answer normalises to "" so it matches the only gold "" (official behaviour)
    assert s["exact"] == pytest.approx(200 / 3) and s["f1"] == pytest.approx(200 / 3)
    assert s["NoAns_total"] == 3 and "HasAns_exact" not in s
    assert "best_f1" not in s  # only with no-answer probabilities, as in the official script


def test_gold_texts_that_normalise_to_nothing():
    # the question has an answer (so it is HasAns), but its only gold normalises to "", so the gold becomes ""
    s = squad_v2_scores({"q": ["the"]}, {"q": ""})
    assert s["exact"] == 100.0 and s["HasAns_total"] == 1 and "NoAns_total" not in s


# Worked example (also in the notebook):
#   id  gold              prediction         na_prob  EM  F1
#   q1  "left effusion"   "left effusion"    0.1      1   1
#   q3  "pneumothorax"    "no pneumothorax"  0.3      0   2/3  (P = 1/2, R = 1)
#   q2  (none)            "effusion"         0.5      0   0
#   q4  (none)            ""                 0.7      1   1
#   q5  "left effusion"   "right effusion"   0.9      0   1/2  (P = R = 1/2)
GOLDS = {"q1": ["left effusion"], "q3": ["pneumothorax"], "q2": [], "q4": [], "q5": ["left effusion"]}
PREDS = {"q1": "left effusion", "q3": "no pneumothorax", "q2": "effusion", "q4": "", "q5": "right effusion"}
NA = {"q1": 0.1, "q3": 0.3, "q2": 0.5, "q4": 0.7, "q5": 0.9}


def test_squad_scores_and_breakdown_by_hand():
    s = squad_v2_scores(GOLDS, PREDS)
    assert s["total"] == 5 and s["HasAns_total"] == 3 and s["NoAns_total"] == 2
    assert s["exact"] == pytest.approx(100 * 2 / 5)                      # q1, q4
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1 + 1 / 2) / 5)  # 63.33
    assert s["HasAns_exact"] == pytest.approx(100 / 3)
    assert s["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)  # 72.22
    assert s["NoAns_exact"] == 50.0 and s["NoAns_f1"] == 50.0


def test_best_threshold_by_hand():
    s = squad_v2_scores(GOLDS, PREDS, NA)
    # Start: every question answered "no answer" -> q2 and q4 right -> score 2.
    # F1 walk by na_prob: q1 +1 -> 3 (best, 0.1); q3 +2/3 -> 3.667 (best, 0.3); q2 -1 (non-empty answer) -> 2.667;
    #                     q4 +0 -> 2.667; q5 +1/2 -> 3.167.  best_f1 = 100 * 3.667 / 5 = 73.33 at 0.3
    assert s["best_f1"] == pytest.approx(100 * (2 + 1 + 2 / 3) / 5) and s["best_f1_thresh"] == 0.3
    # EM walk: q1 +1 -> 3 (best, 0.1); q3 +0 -> 3 (not strictly better); q2 -1 -> 2; q4 -> 2; q5 -> 2
    assert s["best_exact"] == pytest.approx(60.0) and s["best_exact_thresh"] == 0.1
    # q2, q4, q5 (na_prob > 0.3) become "no answer": 1 + 2/3 + 1 + 1 + 0 = 3.667 -> 73.33 again
    assert squad_v2_scores(GOLDS, PREDS, NA, na_prob_thresh=0.3)["f1"] == pytest.approx(100 * (2 + 1 + 2 / 3) / 5)
    # na_prob_thresh does not change the best-threshold search, which uses the raw scores
    assert squad_v2_scores(GOLDS, PREDS, NA, na_prob_thresh=0.0)["best_f1"] == s["best_f1"]


def test_best_threshold_when_nothing_beats_all_no_answer():
    # answering anything only loses: start 2, q1 -1 -> 1, q2 -1 -> 0; best stays the start, thresh 0.0
    s = squad_v2_scores({"q1": [], "q2": []}, {"q1": "x", "q2": "y"}, {"q1": 0.2, "q2": 0.6})
    assert s["best_exact"] == 100.0 and s["best_exact_thresh"] == 0.0 and s["best_f1_thresh"] == 0.0


def test_best_threshold_agrees_with_applying_each_threshold():
    rng = np.random.default_rng(0)
    words = ["left", "right", "small", "effusion", "opacity", "pneumothorax"]
    golds, preds, na = {}, {}, {}
    for i in range(60):
        q = f"q{i}"
        golds[q] = [] if rng.random() < 0.3 else [" ".join(rng.choice(words, rng.integers(1, 4)))]
        preds[q] = "" if rng.random() < 0.2 else " ".join(rng.choice(words, rng.integers(1, 4)))
        na[q] = float(rng.random())
    s = squad_v2_scores(golds, preds, na)
    # with distinct probabilities in (0, 1) every cut point is a threshold; 0.0 answers nothing
    cuts = [0.0] + sorted(na.values())
    f1s = [squad_v2_scores(golds, preds, na, na_prob_thresh=t)["f1"] for t in cuts]
    assert s["best_f1"] == pytest.approx(max(f1s))
    assert s["best_f1_thresh"] == cuts[int(np.argmax(f1s))]


def test_best_threshold_for_negative_no_answer_scores():
    "Fine-tuned QA: null score minus best span score, often negative; abstaining everywhere is best here."
    golds, preds = {"q1": [], "q2": [], "q3": ["left"]}, {"q1": "x", "q2": "y", "q3": "right"}
    na = {"q1": -2.0, "q2": -1.0, "q3": -0.5}
    s = squad_v2_scores(golds, preds, na)
    assert s["best_f1"] == pytest.approx(200 / 3) and s["best_f1_thresh"] < -2.0
    applied = squad_v2_scores(golds, preds, na, na_prob_thresh=s["best_f1_thresh"])
    assert applied["f1"] == pytest.approx(s["best_f1"])   # the official start (0.0) answers all three: f1 0


@pytest.mark.parametrize("scale", ["probability", "score difference"])
@pytest.mark.parametrize("key", ["f1", "exact"])
def test_applying_the_tuned_threshold_reproduces_the_best_score(scale, key):
    "Any real-valued scale, ties included (scores rounded to one decimal): the tuned threshold gives `best_*` back."
    words = ["left", "right", "small", "effusion", "opacity"]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        golds, preds, na = {}, {}, {}
        for i in range(40):
            q = f"q{i}"
            golds[q] = [] if rng.random() < 0.4 else [" ".join(rng.choice(words, rng.integers(1, 3)))]
            preds[q] = "" if rng.random() < 0.2 else " ".join(rng.choice(words, rng.integers(1, 3)))
            raw = rng.random() if scale == "probability" else rng.normal(-2.0, 2.0)
            na[q] = round(float(raw), 1)
        s = squad_v2_scores(golds, preds, na)
        applied = squad_v2_scores(golds, preds, na, na_prob_thresh=s[f"best_{key}_thresh"])
        assert applied[key] == pytest.approx(s[f"best_{key}"]), (seed, s[f"best_{key}_thresh"])


def test_squad_matches_the_literal_reference_on_random_cases():
    import squad2_reference  # tests/squad2_reference.py: the published rules, written out independently
    rng = np.random.default_rng(1)
    words = ["the", "a", "left", "Left,", "effusion.", "small", "opacity", "-", "an"]
    for case in range(20):
        golds, preds, na = {}, {}, {}
        for i in range(30):
            q = f"c{case}q{i}"
            golds[q] = [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(rng.integers(0, 3))]
            preds[q] = " ".join(rng.choice(words, rng.integers(0, 4)))
            # odd cases: many ties, as with rounded probabilities; even cases: distinct probabilities
            na[q] = float(rng.choice([0.1, 0.25, 0.5, 0.75])) if case % 2 else float(rng.uniform(0.01, 1))
        thresh = float(rng.choice([0.2, 0.5, 1.0]))
        ref = squad2_reference.evaluate(golds, preds, na, thresh)
        got = squad_v2_scores(golds, preds, na, thresh)
        assert list(got) == list(ref)
        # With ties the official search can report a best score that no threshold reaches (it splits a tie); here a
        # tie moves together (test_applying_the_tuned_threshold_reproduces_the_best_score). Without ties: identical.
        tied = len(set(na.values())) < len(na)
        for k in ref:
            if not (tied and k.startswith("best_")):
                assert got[k] == pytest.approx(ref[k]), k


def test_tune_on_dev_apply_to_test():
    thresh = tune_no_answer_threshold(GOLDS, PREDS, NA)
    assert thresh == 0.3
    assert tune_no_answer_threshold(GOLDS, PREDS, NA, metric="exact") == 0.1
    test_preds = {"t1": "effusion", "t2": "opacity", "t3": ""}
    test_na = {"t1": 0.3, "t2": 0.31, "t3": 0.9}
    # strictly above the threshold becomes "no answer"; equal to it keeps the prediction
    assert apply_no_answer_threshold(test_preds, test_na, thresh) == {"t1": "effusion", "t2": "", "t3": ""}


@pytest.mark.parametrize("golds,preds,na,match", [
    ({"a": ["x"], "b": []}, {"a": "x"}, None, r"predictions missing for 1 question id\(s\): 'b'"),
    ({f"q{i}": ["x"] for i in range(8)}, {}, None, r"'q0', 'q1', 'q2', 'q3', 'q4' \(and 3 more\)"),
    ({"a": ["x"]}, {"a": "x", "zz": "y"}, None, r"predictions given for 1 unknown question id\(s\): 'zz'"),
    ({"a": ["x"]}, {"a": "x"}, {"a": 0.1, "zz": 0.2}, r"no-answer probabilities given for 1 unknown .*'zz'"),
    ({"a": ["x"], "b": []}, {"a": "x", "b": ""}, {"a": 0.1}, r"no-answer probabilities missing .*'b'"),
    ({"a": ["x"]}, {"a": None}, None, "predictions must be strings"),
    ({"a": "x"}, {"a": "x"}, None, "gold answers must be a list of strings"),
    ({"a": ["x"]}, {"a": "x"}, {"a": float("inf")}, "finite numbers"),
    ({}, {}, None, "at least one gold question"),
])
def test_squad_errors(golds, preds, na, match):
    with pytest.raises(UserError, match=match): squad_v2_scores(golds, preds, na)


def test_squad_threshold_errors():
    with pytest.raises(UserError, match="'f1' or 'exact'"): tune_no_answer_threshold(GOLDS, PREDS, NA, metric="em")
    with pytest.raises(UserError, match="expected no-answer probabilities"):
        tune_no_answer_threshold(GOLDS, PREDS, None)
    with pytest.raises(UserError, match=r"missing for 1 question id\(s\): 'b'"):
        apply_no_answer_threshold({"a": "x", "b": "y"}, {"a": 0.1}, 0.5)
    with pytest.raises(UserError, match="without a prediction: 'c'"):
        apply_no_answer_threshold({"a": "x"}, {"a": 0.1, "c": 0.2}, 0.5)

# ---------------------------------------------------------------- CLIP multi-label

def _clip_data(seed, n=300):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < [0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.15]).astype(int)
    probs = np.clip(0.5 * y + 0.6 * rng.random((n, 7)), 0, 1)
    return y, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_scores_match_sklearn(seed):
    y, probs = _clip_data(seed)
    pred = (probs >= 0.5).astype(int)
    # a label never present nor predicted: F1 0 by zero_division=0
    y[:, 4] = 0
    pred[:, 4] = 0
    s = multilabel_scores(y, pred)
    assert s["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert s["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert list(s["per_label_f1"]) == list(CLIP_LABELS)
    assert list(s["per_label_f1"].values()) == pytest.approx(f1_score(y, pred, average=None, zero_division=0))
    assert s["n"] == len(y)


def test_multilabel_scores_errors():
    y = np.zeros((3, 7), int)
    with pytest.raises(UserError, match=r"shape \(n, 7\)"): multilabel_scores(y[:, :6], y[:, :6])
    with pytest.raises(UserError, match="only 0/1"): multilabel_scores(y, y + 0.5)
    with pytest.raises(UserError, match="same shape"): multilabel_scores(y, y[:2])


def _sk_best(grid, scores):
    "Reference tie-break as documented: highest score, then closest to 0.5, then lower."
    best = max(scores)
    cands = [t for t, s in zip(grid, scores) if s >= best - 1e-12]
    return min(cands, key=lambda t: (abs(t - 0.5), t))


@pytest.mark.parametrize("metric", ["macro_f1", "micro_f1"])
def test_global_threshold_matches_sklearn_grid_search(metric):
    y, probs = _clip_data(3)
    grid = [round(i / 100, 2) for i in range(1, 100)]
    avg = metric.split("_")[0]
    scores = [f1_score(y, (probs >= t).astype(int), average=avg, zero_division=0) for t in grid]
    assert tune_thresholds(y, probs, metric=metric) == _sk_best(grid, scores)


def test_per_label_thresholds_match_sklearn_grid_search():
    y, probs = _clip_data(4)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    got = tune_thresholds(y, probs, per_label=True, grid=grid)
    assert got.shape == (7,)
    for j in range(7):
        scores = [f1_score(y[:, j], (probs[:, j] >= t).astype(int), zero_division=0) for t in grid]
        assert got[j] == _sk_best(grid, scores)


def test_threshold_ties_by_hand():
    y = np.array([[1], [1], [0], [0]])
    # F1 = 1 for any threshold in (0.30, 0.35]: on the default grid 0.31..0.35 tie -> closest to 0.5 is 0.35
    assert tune_thresholds(y, [[0.9], [0.35], [0.2], [0.3]], per_label=True).tolist() == [0.35]
    # F1 = 1 for any threshold in (0.2, 0.8]: 0.5 itself is among the best
    assert tune_thresholds(y, [[0.9], [0.8], [0.2], [0.1]], per_label=True).tolist() == [0.5]
    # 0.4 and 0.6 tie and are equally close to 0.5 -> the lower
    assert tune_thresholds(y, [[0.9], [0.6], [0.2], [0.1]], grid=[0.4, 0.6]) == 0.4


def test_thresholds_never_see_test_labels():
    # the tuning function has no argument through which test data could enter
    assert list(inspect.signature(tune_thresholds).parameters) == ["y_true", "probs", "per_label", "metric", "grid"]
    dev_y, dev_p = _clip_data(5)
    test_y, test_p = _clip_data(6)
    rng = np.random.default_rng(0)

    def evaluate(test_labels):
        t = tune_thresholds(dev_y, dev_p, per_label=True)
        return t, multilabel_scores(test_labels, apply_thresholds(test_p, t))["macro_f1"]

    t1, f1_real = evaluate(test_y)
    t2, f1_perm = evaluate(test_y[rng.permutation(len(test_y))])
    assert np.array_equal(t1, t2)  # test labels shuffled: same thresholds
    assert f1_real != f1_perm      # ... while the test score does change


def test_apply_thresholds():
    probs = np.array([[0.5, 0.2], [0.49, 0.9]])
    assert apply_thresholds(probs, 0.5).tolist() == [[1, 0], [0, 1]]            # at least the threshold
    assert apply_thresholds(probs, [0.4, 0.95]).tolist() == [[1, 0], [1, 0]]    # one per label
    with pytest.raises(UserError, match=r"one per label \(2\)"): apply_thresholds(probs, [0.5, 0.5, 0.5])
    with pytest.raises(UserError, match=r"probabilities in \[0, 1\]"): apply_thresholds(probs * 6 - 3, 0.0)


def test_thresholds_refuse_logits_and_bad_arguments():
    y, probs = _clip_data(7)
    logits = np.log(np.clip(probs, 1e-6, 1 - 1e-6) / (1 - np.clip(probs, 1e-6, 1 - 1e-6)))
    with pytest.raises(UserError, match=r"probabilities in \[0, 1\].*sigmoid"): tune_thresholds(y, logits)
    with pytest.raises(UserError, match="'macro_f1' or 'micro_f1'"): tune_thresholds(y, probs, metric="f1")
    with pytest.raises(UserError, match="same shape"): tune_thresholds(y[:5], probs)
    with pytest.raises(UserError, match="grid must be"): tune_thresholds(y, probs, grid=[])


def test_multilabel_auc_matches_sklearn():
    y, probs = _clip_data(8)
    y[:, 5] = 0  # no positives: AUC undefined
    a = multilabel_auc(y, probs)
    for j, l in enumerate(CLIP_LABELS):
        if j == 5: assert math.isnan(a["per_label_auc"][l])
        else: assert a["per_label_auc"][l] == pytest.approx(roc_auc_score(y[:, j], probs[:, j]))
    assert a["undefined_labels"] == [CLIP_LABELS[5]]
    defined = [roc_auc_score(y[:, j], probs[:, j]) for j in range(7) if j != 5]
    assert a["macro_auc"] == pytest.approx(np.mean(defined))


def test_multilabel_auc_by_hand():
    # positives 0.9, 0.3; negatives 0.4, 0.2: pairs ranked right (0.9>0.4), (0.9>0.2), (0.3>0.2) -> 3/4
    a = multilabel_auc([[1], [0], [1], [0]], [[0.9], [0.4], [0.3], [0.2]], labels=["x"])
    assert a["per_label_auc"]["x"] == pytest.approx(0.75) and a["macro_auc"] == pytest.approx(0.75)


def test_multilabel_auc_refuses_binarised_or_out_of_range():
    y, probs = _clip_data(9)
    with pytest.raises(UserError, match="binarised"): multilabel_auc(y, (probs >= 0.5).astype(float))
    with pytest.raises(UserError, match=r"probabilities in \[0, 1\]"): multilabel_auc(y, probs * 4 - 2)
    probs[0, 0] = np.nan
    with pytest.raises(UserError, match=r"probabilities in \[0, 1\]"): multilabel_auc(y, probs)

# ---------------------------------------------------------------- McNemar and Holm (the two-level bootstrap:
# tests/test_statistics.py)

def test_mcnemar_exact_by_hand():
    a = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
    b = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    m = mcnemar(a, b)
    assert (m["b"], m["c"], m["method"], m["statistic"]) == (10, 2, "exact", 2.0)
    # two-sided binomial, n = 12: 2 * P(X <= 2) = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert m["p_value"] == pytest.approx(158 / 4096)
    # b = 3, c = 0: 2 * (1/2)^3 = 0.25
    assert mcnemar([1, 1, 1], [0, 0, 0])["p_value"] == pytest.approx(0.25)


def test_mcnemar_chi_square_by_hand():
    m = mcnemar([1] * 30 + [0] * 15 + [1] * 50, [0] * 30 + [1] * 15 + [1] * 50)
    # (|30 - 15| - 1)^2 / 45 = 196 / 45; chi-square(1) survival function = erfc(sqrt(x / 2))
    assert m["method"] == "chi2" and m["statistic"] == pytest.approx(196 / 45)
    assert m["p_value"] == pytest.approx(math.erfc(math.sqrt(196 / 45 / 2)))


def test_mcnemar_switches_at_25_discordant_items():
    assert mcnemar([True] * 24, [False] * 24)["method"] == "exact"
    assert mcnemar([True] * 25, [False] * 25)["method"] == "chi2"
    assert mcnemar([1, 0, 1], [1, 0, 1]) == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}


def test_mcnemar_errors():
    with pytest.raises(UserError, match="same items"): mcnemar([1, 0], [1])
    with pytest.raises(UserError, match="0/1"): mcnemar([0.5, 1], [1, 1])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # 0.2 * 3 = 0.6, 0.5 * 2 = 1.0, 0.9 * 1 = 0.9 -> running max 0.6, 1.0, 1.0
    assert holm([0.9, 0.2, 0.5]) == pytest.approx([1.0, 0.6, 1.0])
    assert holm([0.04]) == [0.04] and holm([]) == []


def test_holm_errors():
    with pytest.raises(UserError, match=r"in \[0, 1\]"): holm([0.1, 1.5])
    with pytest.raises(UserError, match=r"in \[0, 1\]"): holm([float("nan")])


def test_clip_parse_failures_predict_no_label_and_the_worst_case_is_kept_beside():
    "A 1 % failure rate moves micro-F1 by about 1 % of the gold labels, not by 20 points (the complement rule)."
    from collections import namedtuple
    from clinical_repro.metrics import generated_multilabel_scores, item_outcomes
    sentence = namedtuple("Sentence", "id labels doc_id")
    rng = np.random.default_rng(5)
    gold = (rng.random((1000, 7)) < 0.2).astype(int)
    predicted_rows = np.where(rng.random(gold.shape) < 0.1, 1 - gold, gold)        # a decent model: micro-F1 ~ .8
    failed = rng.random(1000) < 0.01
    parsed = [None if fail else [label for label, v in zip(CLIP_LABELS, row) if v]
              for fail, row in zip(failed, predicted_rows)]
    s = generated_multilabel_scores(gold, parsed)
    headline = np.where(failed[:, None], 0, predicted_rows)
    worst = np.where(failed[:, None], 1 - gold, predicted_rows)
    assert s["micro_f1"] == pytest.approx(f1_score(gold, headline, average="micro", zero_division=0))
    assert s["macro_f1"] == pytest.approx(f1_score(gold, headline, average="macro", zero_division=0))
    assert s["worst_case"]["micro_f1"] == pytest.approx(f1_score(gold, worst, average="micro", zero_division=0))
    assert s["micro_f1"] - s["worst_case"]["micro_f1"] > 0.01   # the sensitivity column shows what is at stake
    records = [sentence(f"s{i}", tuple(label for label, v in zip(CLIP_LABELS, row) if v), str(i // 10))
               for i, row in enumerate(gold)]
    outcomes = item_outcomes("clip", records, {f"s{i}": p for i, p in enumerate(parsed)})
    assert all(bits == 0 for bits, fail in zip(outcomes["pred"], failed) if fail)   # per-item: no label either

