"""The one statistical procedure (metrics.two_level_bootstrap): counts against scikit-learn, intervals that cover
seeds and item clusters, and a calibration simulation (issue 11, items 4-6): under a true null with seed and item
noise the paired test rejects at about the nominal rate, a clear difference is found most of the time, and the
item-only paired bootstrap it replaces over-rejects."""
import functools, math
from collections import namedtuple

import numpy as np
import pytest
from scipy.special import expit
from scipy.optimize import brentq
from sklearn.metrics import accuracy_score, f1_score

from clinical_repro.core import UserError
from clinical_repro.data import CLIPSentence, NLIRecord, QARecord
from clinical_repro.metrics import (
    clip_bits_to_matrix, interval_label, item_outcomes, metric_from_counts, outcome_counts, two_level_bootstrap,
)

ACCURACY = functools.partial(metric_from_counts, "mednli", "accuracy")


def accuracy_counts(correct):
    "MedNLI-style additive counts (correct, 1) of one seed's 0/1 outcomes."
    correct = np.asarray(correct, float)
    return np.column_stack([correct, np.ones(correct.size)])


# ---------------------------------------------------------------- cluster ids in the per-item outcomes

def test_item_outcomes_carry_integer_cluster_ids_in_order_of_first_appearance():
    nli = [NLIRecord("h1", "Premise B.", "x", "neutral"), NLIRecord("h2", "Premise A.", "y", "entailment"),
           NLIRecord("h3", "Premise B.", "z", "contradiction")]
    assert item_outcomes("mednli", nli, {"h1": "neutral", "h2": None, "h3": "neutral"})["clusters"] == [0, 1, 0]
    qa = [QARecord(f"q{i}", title, "Report.", "?", (), False) for i, title in enumerate(["r9", "r9", "r2", "r9"])]
    assert item_outcomes("radqa", qa, {f"q{i}": "" for i in range(4)})["clusters"] == [0, 0, 1, 0]
    clip = [CLIPSentence(doc, i, ("w",), ()) for doc, i in [("5", 0), ("5", 1), ("11", 0)]]
    outcomes = item_outcomes("clip", clip, {"5:0": [], "5:1": None, "11:0": []})
    assert outcomes["clusters"] == [0, 0, 1] and all(type(c) is int for c in outcomes["clusters"])  # no text
    sentence_without_note = namedtuple("Sentence", "id labels")
    with pytest.raises(UserError, match="has no 'doc_id'"):
        item_outcomes("clip", [sentence_without_note("s0", ())], {"s0": []})


# ---------------------------------------------------------------- additive counts = the official scores

@pytest.mark.parametrize("seed", [0, 1])
def test_counts_of_a_resample_give_the_metric_scored_from_scratch(seed):
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, 400, 400)
    nli = {"gold": rng.integers(0, 3, 400), "pred": rng.integers(-1, 3, 400)}
    sums = outcome_counts("mednli", "accuracy", nli)[resample].sum(0)
    assert metric_from_counts("mednli", "accuracy", sums) == pytest.approx(
        accuracy_score(nli["gold"][resample], nli["pred"][resample]))
    qa = {"exact": rng.integers(0, 2, 400), "f1": rng.random(400)}
    for metric in ("exact", "f1"):
        sums = outcome_counts("radqa", metric, qa)[resample].sum(0)
        assert metric_from_counts("radqa", metric, sums) == pytest.approx(qa[metric][resample].mean())
    clip = {"gold": rng.integers(0, 128, 400), "pred": rng.integers(0, 128, 400)}
    gold, pred = clip_bits_to_matrix(clip["gold"][resample]), clip_bits_to_matrix(clip["pred"][resample])
    for metric, average in (("micro_f1", "micro"), ("macro_f1", "macro")):
        sums = outcome_counts("clip", metric, clip)[resample].sum(0)
        assert metric_from_counts("clip", metric, sums) == pytest.approx(
            f1_score(gold, pred, average=average, zero_division=0))


# ---------------------------------------------------------------- intervals: items, clusters, seeds

CORRECT = (np.random.default_rng(10).random(1500) < 0.8).astype(float)


def width(result):
    return result["high"] - result["low"]


def test_one_seed_single_items_is_the_textbook_interval_of_a_proportion():
    ci = two_level_bootstrap([accuracy_counts(CORRECT)], ACCURACY, n_boot=2000, seed=1)
    p = CORRECT.mean()
    assert ci["point"] == pytest.approx(p) and ci["low"] < p < ci["high"]
    assert width(ci) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 1500), rel=0.1)
    assert two_level_bootstrap([accuracy_counts(CORRECT)], ACCURACY, seed=1)["low"] == \
        two_level_bootstrap([accuracy_counts(CORRECT)], ACCURACY, seed=1)["low"]


def test_clusters_are_resampled_whole():
    "Items that share one outcome per cluster of 10 carry the evidence of 150 items, not 1500: ~sqrt(10) wider."
    shared = np.repeat(CORRECT[:150], 10)
    clusters = np.repeat(np.arange(150), 10)
    by_item = two_level_bootstrap([accuracy_counts(shared)], ACCURACY, n_boot=2000)
    by_cluster = two_level_bootstrap([accuracy_counts(shared)], ACCURACY, clusters=clusters, n_boot=2000)
    assert width(by_cluster) / width(by_item) == pytest.approx(math.sqrt(10), rel=0.15)
    assert by_cluster["n_clusters"] == 150 and by_cluster["n_items"] == 1500


def test_interval_widens_with_seed_spread():
    "Two models, three seeds each on the same items: the one whose seeds disagree gets a wider interval."
    rng = np.random.default_rng(3)
    steady = [accuracy_counts(rng.random(1500) < 0.80) for _ in range(3)]
    spread = [accuracy_counts(rng.random(1500) < p) for p in (0.74, 0.80, 0.86)]
    item_only_width = 2 * 1.96 * math.sqrt(0.8 * 0.2 / 1500 / 3)   # the seed-mean's item noise alone
    steady_ci = two_level_bootstrap(steady, ACCURACY)
    spread_ci = two_level_bootstrap(spread, ACCURACY)
    assert width(spread_ci) > 2 * width(steady_ci) and width(spread_ci) > 3 * item_only_width
    assert interval_label(3, "premise") == "over seeds and items (clusters: premise)"
    assert interval_label(1, "report") == "items only (1 seed; clusters: report)"


def test_paired_interval_and_p_value_come_from_one_distribution():
    rng = np.random.default_rng(7)
    for gain in (0.0, 0.02, 0.04):
        a = [accuracy_counts(rng.random(1500) < 0.78 + gain) for _ in range(3)]
        b = [accuracy_counts(rng.random(1500) < 0.78) for _ in range(3)]
        r = two_level_bootstrap(a, ACCURACY, counts_b=b, n_boot=999, seed=gain > 0)
        other_side = (r["distribution"] <= 0).sum() if r["diff"] > 0 else (r["distribution"] >= 0).sum()
        assert r["p_value"] == pytest.approx(min(1, 2 * (other_side + 1) / 1000))
        assert (r["p_value"] < 0.05) == (not r["low"] <= 0 <= r["high"])
        assert r["diff"] == pytest.approx(np.mean([c[:, 0].mean() for c in a]) - np.mean([c[:, 0].mean() for c in b]))


@pytest.mark.parametrize("kw, match", [
    (dict(counts_a=[]), "per seed"),
    (dict(counts_a=[np.ones((4, 2)), np.ones((3, 2))]), "all of one shape"),
    (dict(counts_b=[np.ones((5, 2))]), "the same items"),
    (dict(clusters=[0, 1]), "one integer cluster id per item"),
    (dict(clusters=[0.5] * 4), "one integer cluster id per item"),
    (dict(clusters=[3] * 4), "at least 2 item clusters"),
    (dict(n_boot=0), "n_boot must be a positive integer"),
    (dict(alpha=1.5), "alpha must be between 0 and 1"),
    (dict(statistic=lambda sums: sums), "one value per row"),
])
def test_bad_input_is_a_user_error(kw, match):
    args = dict(counts_a=[np.ones((4, 2))], statistic=ACCURACY) | kw
    with pytest.raises(UserError, match=match):
        two_level_bootstrap(**args)


# ---------------------------------------------------------------- calibration (issue 11, item 6)
# A MedNLI-like test set of 1,401 items in 467 premises of 3 hypotheses; two models, 3 seeds each.
# P(correct) = expit(mu_model + premise + item + model x premise + seed shift): the premise and item effects are
# shared by both models (difficulty), the model x premise effect is not (what one model learned), and the seed shift
# moves a seed's expected accuracy by about .01 (sd). Under the null both models have the same expected accuracy
# (.80) over items and seeds; the alternative adds 3 points to the first model.
N_CLUSTERS, CLUSTER_SIZE, N_SEEDS, N_SIMS, N_BOOT = 467, 3, 3, 300, 200
SD_PREMISE, SD_ITEM, SD_MODEL_PREMISE, SEED_SD_ACCURACY = 1.0, 1.0, 0.5, 0.01


@functools.lru_cache(maxsize=None)
def _population():
    "mu for a mean accuracy, and the seed sd on the logit scale that gives SEED_SD_ACCURACY on the accuracy scale."
    z = np.random.default_rng(0).normal(0, math.hypot(SD_PREMISE, SD_ITEM, SD_MODEL_PREMISE), 200_000)
    mu = lambda accuracy: brentq(lambda m: expit(m + z).mean() - accuracy, -10, 10)
    slope = lambda m: (expit(m + z) * (1 - expit(m + z))).mean()   # d accuracy / d shift
    return mu, SEED_SD_ACCURACY / slope(mu(0.80))


def simulate(gain, n_sims=N_SIMS, seed=0):
    "(n_sims, 2 models, N_SEEDS, n_items) 0/1 outcomes and the items' clusters."
    mu, seed_sd = _population()
    rng = np.random.default_rng(seed)
    premise = rng.normal(0, SD_PREMISE, (n_sims, 1, 1, N_CLUSTERS, 1))
    item = rng.normal(0, SD_ITEM, (n_sims, 1, 1, N_CLUSTERS, CLUSTER_SIZE))
    model_premise = rng.normal(0, SD_MODEL_PREMISE, (n_sims, 2, 1, N_CLUSTERS, 1))
    shift = rng.normal(0, seed_sd, (n_sims, 2, N_SEEDS, 1, 1))
    means = np.array([mu(0.80 + gain), mu(0.80)]).reshape(1, 2, 1, 1, 1)
    logits = means + premise + item + model_premise + shift
    correct = rng.random(logits.shape) < expit(logits)
    return correct.reshape(n_sims, 2, N_SEEDS, -1), np.repeat(np.arange(N_CLUSTERS), CLUSTER_SIZE)


def new_p_values(correct, clusters):
    "The procedure every table uses now: two_level_bootstrap, per simulated comparison."
    return np.array([two_level_bootstrap([accuracy_counts(c) for c in sim[0]], ACCURACY,
                                         counts_b=[accuracy_counts(c) for c in sim[1]], clusters=clusters,
                                         n_boot=N_BOOT, seed=k)["p_value"] for k, sim in enumerate(correct)])


def old_p_values(correct, seed=0):
    """The procedure it replaces (metrics.paired_bootstrap as report used it until issue 11): the same resampled
    items for every seed of both models, seeds fixed; p from the resampled differences of seed-averaged accuracy."""
    rng = np.random.default_rng(seed)
    per_item = correct[:, 0].mean(1) - correct[:, 1].mean(1)          # (n_sims, n_items)
    n_items = per_item.shape[1]
    p_values = []
    for diffs in per_item:
        picks = rng.integers(0, n_items, (N_BOOT, n_items))
        resampled, observed = diffs[picks].mean(1), diffs.mean()
        other_side = (resampled <= 0).sum() if observed > 0 else (resampled >= 0).sum()
        p_values.append(1.0 if observed == 0 else min(1.0, 2 * (other_side + 1) / (N_BOOT + 1)))
    return np.array(p_values)


@pytest.fixture(scope="module")
def null_and_gain():
    return simulate(0.0, seed=1), simulate(0.03, seed=2)


def test_simulation_has_the_intended_noise(null_and_gain):
    (null, _), (gained, _) = null_and_gain
    accuracy = null.mean(-1)                                          # (n_sims, 2, seeds)
    seed_sd = accuracy.std(2, ddof=1).mean()                          # per-seed sd on one test set (incl. flips)
    assert 0.01 < seed_sd < 0.02
    assert accuracy.mean() == pytest.approx(0.80, abs=0.01)
    assert (gained[:, 0].mean() - gained[:, 1].mean()) == pytest.approx(0.03, abs=0.005)


def test_paired_test_is_calibrated_under_the_null_and_the_old_one_is_not(null_and_gain):
    (null, clusters), _ = null_and_gain
    new_rate = (new_p_values(null, clusters) < 0.05).mean()
    old_rate = (old_p_values(null) < 0.05).mean()
    # measured over 1,000 simulations (n_boot 200): new .024, old .193; over 500 with n_boot 1,000: .042 and .212
    assert new_rate <= 0.07          # the nominal 5 %, with Monte Carlo room (300 simulations: se ~1.3 points)
    assert old_rate > 0.12           # what was wrong: the item-only test fails the same bound by far


def test_paired_test_detects_a_clear_difference(null_and_gain):
    """3 points at n = 1,401 with 3 seeds: found in ~60 % of the simulations (measured: .59 over 1,000 simulations
    with n_boot 200, .60 over 500 with n_boot 1,000; 4 points: .86, 5 points: .97). Not more: the true sd of the
    difference is ~.012 here, so even a test that knew it would find 3 points only ~70 % of the time, and
    resampling seeds and items of a crossed design counts the seed-by-item noise twice (mildly conservative)."""
    _, (gained, clusters) = null_and_gain
    assert (new_p_values(gained, clusters) < 0.05).mean() > 0.45
