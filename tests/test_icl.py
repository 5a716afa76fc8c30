"""In-context learning: likelihood scoring against direct computation, a known-answer rank case, strict parsing
with counted failures, encoders without an MLM head, remote APIs refused, and one unit per task on synthetic data."""
import json, os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from clinical_repro import icl, models
from clinical_repro.core import UserError
from clinical_repro.data import load_task
from clinical_repro.models import ModelSpec
from clinical_repro.prompts import prompt_version
from clinical_repro.tasks import MEDNLI_LABELS, icl_dev_n


@pytest.fixture(scope="module")
def tiny_t5():
    rm = models.resolve_model("t5-tiny-demo")
    return models.load_tokenizer(rm), models.load_model(rm, "seq2seq")


def test_sequence_logprobs_match_the_model_loss(tiny_t5):
    tok, model = tiny_t5
    prompts = ["Premise: the patient has a fever\nAnswer:", "x",
               "a much longer prompt with many more words in it than the others"]
    conts = ["entailment", "no", "left lower lobe opacity"]
    s, n = icl.sequence_logprobs(model, tok, prompts, conts, batch_size=2)
    for p, c, si, ni in zip(prompts, conts, s, n):
        enc = tok(p, return_tensors="pt")
        lab = tok(text_target=c, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(**enc, labels=lab).loss.item()  # mean token NLL
        assert ni == lab.shape[1]
        assert abs(si - (-loss * ni)) < 1e-4
    # the shared-encoder path gives the same numbers
    o, on = icl.option_logprobs(model, tok, prompts, conts, batch_size=2)
    assert np.allclose(np.diag(o), s, atol=1e-4) and (np.diag(on) == n).all()


def _memorise(model, enc, labels, steps:int=30):
    "Overfit `model` on one example (30 Adam steps) so that its answer is known."
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()


def test_rank_classification_picks_a_memorised_answer():
    rm = models.resolve_model("t5-tiny-demo")
    tok, model = models.load_tokenizer(rm), models.load_model(rm, "seq2seq")
    prompt = "Premise: no fever today\nHypothesis: the patient is afebrile\nAnswer:"
    enc = tok(prompt, return_tensors="pt")
    lab = tok(text_target="contradiction", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    _memorise(model, enc, lab)
    for norm in ("sum", "mean"):
        best, scores = icl.rank_classify(model, tok, [prompt, prompt], list(MEDNLI_LABELS), normalisation=norm)
        assert [MEDNLI_LABELS[i] for i in best] == ["contradiction", "contradiction"]
        assert scores.shape == (2, 3)
    with pytest.raises(UserError, match="normalisation"):
        icl.rank_classify(model, tok, [prompt], list(MEDNLI_LABELS), normalisation="max")


def _query_ids(pred_file, task):
    test = json.loads(Path(pred_file).read_text())["test"]
    return {i for v in test.values() for k in ("raw", "labels", "rank") if k in v for i in v[k]}


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_icl_unit_writes_the_results_layout(tiny_release, tmp_path, task):
    data, _ = tiny_release
    r = icl.run_icl_unit(task, "t5-tiny-demo", data, tmp_path, shots=2, draw=1, seed=3, limit=6)
    path = tmp_path/f"{r['run_id']}.json"
    saved = json.loads(path.read_text())
    assert saved["status"] == "ok" and saved["mode"] == "icl" and saved["task"] == task
    assert (saved["shots"], saved["draw"], saved["seed"], saved["counts"]["limit"]) == (2, 1, 3, 6)
    assert saved["counts"]["test"] == 6 and saved["counts"]["dev_sample"] == 6
    assert saved["provenance"]["prompt_version"] == prompt_version(task)
    td = load_task(data, task)
    train_ids = {x.id for x in td.splits["train"]}
    assert len(saved["exemplar_ids"]) == 2 and set(saved["exemplar_ids"]) <= train_ids
    queries = _query_ids(tmp_path/saved["predictions"], task)
    assert len(queries) == 6 and queries <= {x.id for x in td.splits["test"]}
    assert not set(saved["exemplar_ids"]) & queries
    m = saved["metrics"]["test"]
    if task == "mednli":
        assert saved["template"]["template"] in saved["template"]["scores"]
        assert set(m) == {"rank", "generate"} and m["generate"]["parse_failures"]["n"] == 6
        assert saved["normalisation"] == "sum"
    elif task == "clip":
        assert set(m) == {"per_label", "list"} and m["list"]["parse_failures"]["n"] == 6
        assert set(saved["provenance"]["template_id"]) == {"per_label", "list"}
    else:
        assert 0 <= m["f1"] <= 100 and "verbatim_span_rate" in m
    assert saved["cost"]["tokens_in"] > 0 and saved["cost"]["test_items_per_second"] > 0
    # a finished unit is not run again
    again = icl.run_icl_unit(task, "t5-tiny-demo", data, tmp_path, shots=2, draw=1, seed=3, limit=6)
    assert again == saved


def test_unparseable_generations_are_counted_never_mapped(tiny_release, tmp_path, monkeypatch):
    data, _ = tiny_release
    def garbage(model, tok, prompts, max_new_tokens, batch_size=16): return ["blorp ###"] * len(prompts), 10, 10
    monkeypatch.setattr(icl, "generate", garbage)
    r = icl.run_icl_unit("mednli", "t5-tiny-demo", data, tmp_path, shots=1, limit=5, template="paper")
    g = r["metrics"]["test"]["generate"]
    assert g["parse_failures"] == {"n": 5, "failures": 5, "rate": 1.0}
    assert g["accuracy"] == 0.0  # every failure counted wrong, none became a class
    preds = json.loads((tmp_path/r["predictions"]).read_text())["test"]["mednli"]["generate"]
    assert set(preds.values()) == {None}
    c = icl.run_icl_unit("clip", "t5-tiny-demo", data, tmp_path, shots=1, limit=5)
    lst = c["metrics"]["test"]["list"]
    assert lst["parse_failures"] == {"n": 5, "failures": 5, "rate": 1.0}
    assert lst["micro_f1"] == 0.0 and lst["parsed_only"] is None   # failures predict no label
    assert lst["worst_case"]["micro_f1"] <= lst["micro_f1"] + 1e-12    # the complement, kept as a sensitivity column


def test_encoder_without_mlm_head_is_not_applicable(tiny_release, tmp_path, monkeypatch):
    data, _ = tiny_release
    def boom(*a, **k): raise AssertionError("no model may be loaded")
    monkeypatch.setattr(models, "load_model", boom)
    r = icl.run_icl_unit("mednli", "minilm-demo", data, tmp_path, shots=1)
    assert r["status"] == "not_applicable" and r["mode"] == "icl" and r["metrics"] is None
    assert "masked-LM head" in r["reason"] and "random classification head" in r["reason"]
    assert json.loads((tmp_path/f"{r['run_id']}.json").read_text())["status"] == "not_applicable"
    assert not (tmp_path/"predictions").exists()


@pytest.mark.parametrize("hub_id", ["https://api.openai.com/v1/completions", "openai:gpt-3.5-turbo"])
def test_remote_api_is_refused(tiny_release, tmp_path, hub_id):
    data, _ = tiny_release
    reg = dict(models.load_registry())
    reg["gpt-3"] = ModelSpec(paper_name="GPT-3", hub_id=hub_id, family="decoder", domain="general",
                             size_m=175000, modes=["icl"], has_mlm_head=False)
    with pytest.raises(UserError, match="data-use"):
        icl.run_icl_unit("mednli", "gpt-3", data, tmp_path/"out", shots=1, registry=reg)
    assert not (tmp_path/"out").exists()


def test_bad_arguments(tiny_release, tmp_path):
    data, _ = tiny_release
    with pytest.raises(UserError, match="template"):
        icl.run_icl_unit("mednli", "t5-tiny-demo", data, tmp_path, shots=1, template="nope")
    with pytest.raises(UserError, match="limit"):
        icl.run_icl_unit("mednli", "t5-tiny-demo", data, tmp_path, shots=1, limit=0)


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    "A tiny random BertForMaskedLM with the MiniLM tokenizer, saved as a local folder, and a registry naming it."
    from transformers import BertConfig, BertForMaskedLM
    d = tmp_path_factory.mktemp("tiny-mlm")
    tok = models.load_tokenizer(models.resolve_model("minilm-demo"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(d)
    tok.save_pretrained(d)
    reg = dict(models.load_registry())
    reg["tiny-mlm"] = ModelSpec(paper_name="tiny MLM", local_path=str(d), family="encoder", domain="general",
                                size_m=1, modes=["icl"], has_mlm_head=True)
    return d, reg


def test_cloze_rank_picks_a_memorised_answer(tiny_mlm):
    from transformers import AutoModelForMaskedLM
    d, _ = tiny_mlm
    tok = models.load_tokenizer(models.resolve_model("minilm-demo"))
    model = AutoModelForMaskedLM.from_pretrained(d)
    prompt = "Premise: no fever\nHypothesis: afebrile\nAnswer:"
    enc = tok(prompt + " " + tok.mask_token, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    labels[enc["input_ids"] == tok.mask_token_id] = tok(" neutral", add_special_tokens=False)["input_ids"][0]
    _memorise(model, enc, labels)
    best, _ = icl.rank_classify(model, tok, [prompt], ["neutral", "contradiction"])  # single-token verbalizers
    assert best.tolist() == [0]


def test_cloze_units_for_an_encoder_with_mlm_head(tiny_release, tmp_path, tiny_mlm):
    data, _ = tiny_release
    _, reg = tiny_mlm
    r = icl.run_icl_unit("mednli", "tiny-mlm", data, tmp_path, shots=1, limit=4, registry=reg)
    assert r["status"] == "ok" and r["protocol"] == "cloze" and set(r["metrics"]["test"]) == {"rank"}
    c = icl.run_icl_unit("clip", "tiny-mlm", data, tmp_path, shots=1, limit=4, registry=reg)
    assert set(c["metrics"]["test"]) == {"per_label"} and "list" in c["not_applicable_parts"]
    q = icl.run_icl_unit("radqa", "tiny-mlm", data, tmp_path, shots=1, limit=4, registry=reg)
    assert q["status"] == "not_applicable" and "RadQA" in q["reason"]


def test_icl_cli_records_not_applicable_for_an_encoder_without_mlm_head(tiny_release, tmp_path, run_cli):
    r = run_cli("icl", "--task", "mednli", "--model", "minilm-demo", "--data-dir", tiny_release[0], "--out", tmp_path,
                "--shots", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["status"] == "not_applicable" and "masked-LM head" in res["reason"] and res["mode"] == "icl"
    assert (tmp_path / f"{res['run_id']}.json").is_file()
    assert res["config"]["dev_sample"] == icl_dev_n()   # the registry's default dev sample
