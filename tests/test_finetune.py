"""Fine-tuning units end to end on the tiny synthetic releases with the offline demo models: results files, OOM
recovery in training and evaluation, interrupt-and-resume, caching, and test labels kept out of reach.

Training is the cost here, so runs are shared where the assertions allow: one straight unit (`trained_unit`) serves
the results-file, caching and resume tests, and one interrupted unit (`interrupted_unit`) is copied by each resume
test. Tests sharing them are in one xdist group, so one worker trains them once (with `--dist loadgroup`)."""
import json, shutil

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from clinical_repro import experiment, identity
from clinical_repro.core import UserError
from clinical_repro.data import CLIPNote, CLIPSentence, NLIRecord
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS

# Small, fast units: a small effective batch and a few steps, evaluated (and checkpointed) every 2 steps.
FAST = {"effective_batch": 16, "max_steps": 6, "eval_steps": 2}
CLIP_FAST = {"window_tokens": 48}
SHARED = pytest.mark.xdist_group("finetune-trained-unit")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def unit(data, out, task="mednli", model="t5-tiny-demo", train=None, task_params=None, **kw):
    return experiment.run_unit(task, model, data, out, seed=0, train_overrides={**FAST, **(train or {})},
                               task_overrides=task_params, **kw)


class Fault(TrainerCallback):
    "Raise `error` once: at the start of training step `step`, or at the `eval_call`-th evaluation batch."
    def __init__(self, error, step=None, eval_call=None):
        self.error, self.step, self.eval_call, self.fired, self.evals = error, step, eval_call, False, 0

    def on_step_begin(self, args, state, control, **kw):
        if self.step is not None and not self.fired and state.global_step == self.step:
            self.fired = True
            raise self.error

    def on_prediction_step(self, args, state, control, **kw):
        self.evals += 1
        if self.eval_call is not None and not self.fired and self.evals == self.eval_call:
            self.fired = True
            raise self.error


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


@pytest.fixture(scope="module")
def trained_unit(tiny_release, tmp_path_factory):
    "One straight MedNLI unit (tiny T5, 6 steps): its results and its output folder (read-only: copy to change it)."
    out = tmp_path_factory.mktemp("trained-unit")
    return unit(tiny_release[0], out), out


@pytest.fixture(scope="module")
def interrupted_unit(tiny_release, tmp_path_factory):
    "The same unit interrupted at step 5 (checkpoints at steps 2 and 4): its output folder (copy it to resume)."
    out = tmp_path_factory.mktemp("interrupted-unit")
    with pytest.raises(KeyboardInterrupt):
        unit(tiny_release[0], out, callbacks=[Fault(KeyboardInterrupt(), step=5)])
    return out


# ---- the results file ------------------------------------------------------------------------------------------------

@SHARED
def test_results_file_has_the_contracted_fields(trained_unit):
    res, out = trained_unit
    path = out / f"{res['run_id']}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(res))
    for k in ("run_id", "status", "task", "model", "mode", "seed", "fraction", "shots", "draw", "metrics", "thresholds",
              "counts", "predictions", "config", "provenance", "cost"):
        assert k in on_disk, k
    assert on_disk["status"] == "ok" and on_disk["mode"] == "finetune" and on_disk["synthetic_demo"] is True
    assert on_disk["config"]["family"] == "seq2seq"
    assert set(on_disk["metrics"]) == {"dev", "test"}
    assert {"accuracy", "macro_f1", "n", "confusion", "parse_failures"} <= set(on_disk["metrics"]["test"])
    assert {"n", "failures", "rate"} <= set(on_disk["metrics"]["test"]["parse_failures"])  # counted, never a class
    assert on_disk["counts"]["test"] == on_disk["metrics"]["test"]["n"] == 30
    prov = on_disk["provenance"]
    assert prov["precision"] == "fp32" and prov["device"]["type"] == "cpu"
    assert all(len(h) == 64 for h in prov["data_files"].values()) and prov["packages"]["transformers"]
    cost = on_disk["cost"]
    for k in ("wall_seconds", "train_seconds", "eval_seconds", "samples_per_second", "tokens_per_second", "peak_rss_mb",
              "gpu_hours", "per_device_batch", "accumulation", "effective_batch", "oom_retries", "resumed"):
        assert k in cost, k
    # one epoch of the 90 tiny pairs, last batch short
    assert cost["effective_batch"] == 16 and cost["optimizer_steps"] == 6 and cost["train_samples"] == 90
    assert 0 < cost["padding_efficiency"] <= 1
    assert [r["step"] for r in on_disk["dev_history"]] == [2, 4, 6]   # the per-evaluation dev metrics
    preds = json.loads((out / on_disk["predictions"]).read_text())
    assert len(preds["test"]) == 30 and set(preds["test"].values()) <= set(MEDNLI_LABELS) | {None}
    assert not list((out / "work" / res["run_id"]).glob("checkpoint-*"))  # removed at the end
    assert (out / "logs" / f"{res['run_id']}.log").read_text().count("done") == 1


@SHARED
def test_a_finished_unit_is_never_run_again(tiny_release, trained_unit, monkeypatch):
    first, out = trained_unit
    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("a cached unit was trained again"))
    assert unit(tiny_release[0], out) == json.loads(json.dumps(first))


# ---- memory and interruptions ----------------------------------------------------------------------------------------

def test_training_oom_halves_the_batch_and_keeps_the_effective_batch(tiny_release, tmp_path):
    res = unit(tiny_release[0], tmp_path, callbacks=[Fault(oom(), step=3)])
    cost = res["cost"]
    assert cost["oom_retries"] == 1
    r = cost["retries"][0]
    assert r["phase"] == "train" and r["step"] == 3 and r["resumed_from"] == "checkpoint-2"
    assert (r["from"]["per_device"], r["from"]["accumulation"]) == (16, 1)
    assert (r["to"]["per_device"], r["to"]["accumulation"]) == (8, 2)
    assert (cost["per_device_batch"], cost["accumulation"], cost["effective_batch"]) == (8, 2, 16)
    assert cost["optimizer_steps"] == 6
    assert [r["step"] for r in res["dev_history"]] == [2, 4, 6]   # one row per evaluation, none repeated


def test_evaluation_oom_halves_the_eval_batch_and_completes(tiny_release, tmp_path):
    res = unit(tiny_release[0], tmp_path, callbacks=[Fault(oom(), eval_call=1)])
    cost = res["cost"]
    assert cost["oom_retries"] == 1 and cost["retries"][0]["phase"] == "eval"
    assert cost["retries"][0]["to"]["eval_batch"] == cost["retries"][0]["from"]["eval_batch"] // 2
    assert cost["effective_batch"] == 16 and cost["optimizer_steps"] == 6
    assert res["metrics"]["test"]["n"] == 30


def test_dev_is_not_predicted_again_after_training(tiny_release, tmp_path, monkeypatch):
    "The best checkpoint's dev predictions come from its own evaluation: after training, one pass (test) remains."
    passes = []
    predict = experiment.predict_safely
    def counted(trainer, ds, *args, **kwargs):
        passes.append(len(ds))
        return predict(trainer, ds, *args, **kwargs)
    monkeypatch.setattr(experiment, "predict_safely", counted)
    res = unit(tiny_release[0], tmp_path)
    assert passes == [res["counts"]["test_features"]]
    best = max(res["dev_history"], key=lambda row: row["accuracy"])      # max keeps the first best, as the Trainer
    assert res["best_step"] == best["step"]
    assert res["metrics"]["dev"]["accuracy"] == pytest.approx(best["accuracy"])


def _copy(interrupted_unit, tmp_path):
    "A private copy of the shared interrupted unit's output folder (each resume test mutates its own)."
    out = tmp_path / "b"
    shutil.copytree(interrupted_unit, out)
    return out


@SHARED
def test_interrupted_unit_resumes_with_the_same_number_of_steps(tiny_release, trained_unit, interrupted_unit,
                                                                tmp_path):
    straight, _ = trained_unit
    out = _copy(interrupted_unit, tmp_path)
    assert not list(out.glob("*.json"))                          # no results file for an unfinished unit
    assert (out / "work" / straight["run_id"] / "checkpoint-4").is_dir()
    resumed = unit(tiny_release[0], out)
    assert resumed["run_id"] == straight["run_id"]
    assert resumed["cost"]["resumed"] is True and straight["cost"]["resumed"] is False
    assert resumed["cost"]["optimizer_steps"] == straight["cost"]["optimizer_steps"] == 6
    assert resumed["metrics"]["test"]["accuracy"] == pytest.approx(straight["metrics"]["test"]["accuracy"])
    assert [r["step"] for r in resumed["dev_history"]] == [2, 4, 6]   # the history survives the interruption
    assert resumed["dev_history"][0]["accuracy"] == pytest.approx(straight["dev_history"][0]["accuracy"])


@SHARED
def test_a_checkpoint_cut_short_by_a_kill_is_skipped_on_resume(tiny_release, trained_unit, interrupted_unit,
                                                               tmp_path):
    straight, _ = trained_unit
    out = _copy(interrupted_unit, tmp_path)
    work = out / "work" / straight["run_id"]
    (work / "checkpoint-4" / "trainer_state.json").unlink()        # as if killed while saving checkpoint-4
    resumed = unit(tiny_release[0], out)
    assert resumed["cost"]["resumed"] is True and resumed["cost"]["optimizer_steps"] == 6
    assert resumed["metrics"]["test"]["accuracy"] == pytest.approx(straight["metrics"]["test"]["accuracy"])


# ---- test labels -----------------------------------------------------------------------------------------------------

class _Phase:
    scoring = False
    early_reads = 0
    reads = 0


def _spy(cls, gold_field):
    class Spy(cls):
        def __getattribute__(self, name):
            if name == gold_field:
                _Phase.reads += 1
                if not _Phase.scoring:
                    _Phase.early_reads += 1
            return object.__getattribute__(self, name)
    return Spy


def _spied_release(real_load):
    "`load_task` whose test records count every read of their gold field."
    SpyNLI, SpySentence = _spy(NLIRecord, "label"), _spy(CLIPSentence, "labels")

    def load(data_dir, task):
        task_data = real_load(data_dir, task)
        if task == "mednli":
            test = task_data.splits["test"]
            task_data.splits["test"] = [SpyNLI(r.id, r.premise, r.hypothesis, r.label) for r in test]
        else:
            task_data.notes["test"] = [
                CLIPNote(n.doc_id, tuple(SpySentence(s.doc_id, s.sent_index, s.tokens, s.labels) for s in n.sentences))
                for n in task_data.notes["test"]]
            task_data.splits["test"] = [s for n in task_data.notes["test"] for s in n.sentences]
        return task_data
    return load


@pytest.mark.parametrize("task", ["mednli", "clip"])
def test_test_labels_are_read_only_by_the_final_scoring(tiny_release, tmp_path, monkeypatch, task):
    "Also the encoder runs of `test_every_task_trains_with_both_demo_models` (the same units, spied on)."
    real_score = experiment.score_test

    def score(*a, **k):
        _Phase.scoring = True
        try:
            return real_score(*a, **k)
        finally:
            _Phase.scoring = False

    _Phase.early_reads = _Phase.reads = 0
    monkeypatch.setattr(identity, "load_task", _spied_release(identity.load_task))   # where a unit reads its data
    monkeypatch.setattr(experiment, "score_test", score)
    res = unit(tiny_release[0], tmp_path, task=task, model="minilm-demo", train={"max_steps": 2},
               task_params=CLIP_FAST if task == "clip" else None)
    assert _Phase.reads > 0                 # the spies work: scoring did read the test labels
    assert _Phase.early_reads == 0          # and nothing before it did
    assert res["status"] == "ok" and res["config"]["family"] == "encoder" and res["synthetic_demo"] is True
    m = res["metrics"]["test"]
    if task == "clip":
        assert 0 < res["thresholds"]["threshold"] < 1
        assert {"micro_f1", "macro_f1", "per_label_f1"} <= set(m) and set(m["per_label_f1"]) == set(CLIP_LABELS)
    else:
        assert m["n"] == 30


# ---- every task, both demo models ------------------------------------------------------------------------------------

# MedNLI with the tiny T5 is `trained_unit`; the two encoder runs are in `test_test_labels_are_read_only_...`.
@pytest.mark.parametrize("task,model", [("radqa", "minilm-demo"), ("radqa", "t5-tiny-demo"), ("clip", "t5-tiny-demo")])
def test_every_task_trains_with_both_demo_models(tiny_release, tmp_path, task, model):
    settings = {("radqa", "minilm-demo"): {"max_length": 128, "doc_stride": 32},
                ("radqa", "t5-tiny-demo"): {"max_source_length": 256, "max_target_length": 48},
                ("clip", "t5-tiny-demo"): {"window_tokens": 48, "max_source_length": 96, "num_beams": 2}}
    task_params = settings[task, model]
    res = unit(tiny_release[0], tmp_path, task=task, model=model, train={"max_steps": 2, "eval_steps": 2},
               task_params=task_params)
    m = res["metrics"]["test"]
    assert res["status"] == "ok" and res["config"]["family"] == ("encoder" if model == "minilm-demo" else "seq2seq")
    if task == "radqa":
        assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "total"} <= set(m) and m["total"] == 20
        if model == "minilm-demo":
            assert "no_answer_threshold" in res["thresholds"]
            paper = res["paper_protocol"]   # the paper's untuned threshold beside the tuned headline (issue 11, 7)
            assert paper["n_test"] == 20 and paper["test"].keys() == m.keys() and "not tuned" in paper["description"]
    if (task, model) != ("radqa", "minilm-demo"):
        assert "paper_protocol" not in res   # the paper's protocol is this unit's own
    counts = res["counts"]["train_composition"]   # what the unit was trained on (the CLIP subsets' label counts)
    assert counts["items"] == res["counts"]["train"]
    assert set(counts.get("labels", {})) == {"mednli": set(MEDNLI_LABELS), "clip": set(CLIP_LABELS)}.get(task, set())
    if task == "clip":
        assert {"micro_f1", "macro_f1", "per_label_f1"} <= set(m) and set(m["per_label_f1"]) == set(CLIP_LABELS)
    if model == "t5-tiny-demo":
        assert {"n", "failures", "rate"} <= set(m["parse_failures"])   # counted, never mapped to a class
    assert res["synthetic_demo"] is True


def test_an_unset_task_setting_is_a_clear_error(tiny_release, tmp_path):
    with pytest.raises(UserError, match="'max_length' is not set"):
        unit(tiny_release[0], tmp_path, model="minilm-demo", task_params={"max_length": None})


def test_finetune_cli(tiny_release, tmp_path, run_main):
    "In-process (the console script's start-up is run by every grid test): the command, its JSON and its file."
    code, out, err = run_main("finetune", "--task", "mednli", "--model", "minilm-demo", "--data-dir", tiny_release[0],
                              "--out", tmp_path, "--max-steps", "2", "--json")
    assert code == 0, err[-2000:]
    res = json.loads(out)
    assert res["status"] == "ok" and (tmp_path / f"{res['run_id']}.json").is_file()


def test_unknown_model_is_a_clear_error(tiny_release, tmp_path, run_main):
    code, _, err = run_main("finetune", "--task", "mednli", "--model", "gpt-5", "--data-dir", tiny_release[0],
                            "--out", tmp_path)   # in-process: an error path needs no new interpreter
    assert code == 2   # run_main also checks that no traceback was printed
    assert "gpt-5" in err and "minilm-demo" in err and "bioclinicalbert" in err
    assert not any(tmp_path.iterdir())


# ---- head_bias: prior (a multi-label head starts at each label's share) ---------------------------------------------

def _tiny(cls_name, config_name, **kw):
    import transformers
    config = getattr(transformers, config_name)(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3, **kw)
    return getattr(transformers, cls_name)(config)


@pytest.mark.parametrize("cls_name,config_name", [("BertForSequenceClassification", "BertConfig"),
                                                  ("RobertaForSequenceClassification", "RobertaConfig")])
def test_prior_bias_makes_the_untrained_head_predict_each_labels_share(cls_name, config_name):
    model = _tiny(cls_name, config_name)
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])   # shares 3/4, 1/4, 1/4
    experiment.prior_bias(model, labels)
    layer = experiment.output_layer(model, 3)
    assert layer is (model.classifier if cls_name.startswith("Bert") else model.classifier.out_proj)
    assert torch.sigmoid(layer.bias).tolist() == pytest.approx([0.75, 0.25, 0.25], abs=1e-6)
    assert layer.bias[0].item() == pytest.approx(np.log(3), abs=1e-6)   # log odds of 3/4 by hand


def test_prior_bias_on_a_head_without_bias_is_a_clear_error():
    model = _tiny("LlamaForSequenceClassification", "LlamaConfig", num_key_value_heads=2)
    with pytest.raises(UserError, match="head_bias 'prior'.*LlamaForSequenceClassification|"
                                        "LlamaForSequenceClassification.*head_bias 'prior'"):
        experiment.prior_bias(model, np.array([[1, 0, 0], [0, 1, 0]]))


class _HeadAtStart(TrainerCallback):
    "Keeps the classifier's bias as training starts."
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.bias = experiment.output_layer(model, len(CLIP_LABELS)).bias.detach().clone()


def test_a_clip_unit_with_head_bias_prior_starts_from_the_training_shares(tiny_release, tmp_path):
    spy = _HeadAtStart()
    res = unit(tiny_release[0], tmp_path, task="clip", model="minilm-demo", train={"max_steps": 1, "eval_steps": 1},
               task_params={**CLIP_FAST, "head_bias": "prior"}, callbacks=[spy])
    counts = res["counts"]["train_composition"]   # sentences and positives per label, from the results file
    shares = [max(counts["labels"][label], 1e-4 * counts["items"]) / counts["items"] for label in CLIP_LABELS]
    assert torch.sigmoid(spy.bias).tolist() == pytest.approx(shares, rel=1e-4)
    assert res["config"]["task_params"]["head_bias"] == "prior"


def test_head_bias_prior_on_a_single_label_task_is_a_clear_error(tiny_release, tmp_path):
    with pytest.raises(UserError, match="mednli: head_bias 'prior' is defined for multi-label heads"):
        unit(tiny_release[0], tmp_path, model="minilm-demo", task_params={"head_bias": "prior"})
    assert not list(tmp_path.glob("*.json"))   # nothing written
