"""In-context learning: likelihood scoring against direct computation, a known-answer rank case, strict parsing
with counted failures, encoders without an MLM head, remote APIs refused, and one unit per task on synthetic data."""
import json, os, re, shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from clinical_repro import icl, models
from clinical_repro.config import default_params_dir
from clinical_repro.core import UserError
from clinical_repro.data import load_task
from clinical_repro.models import ModelSpec
from clinical_repro.prompts import prompt_version
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS, icl_dev_n


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


# ---- issue 11, item 3: cloze with one-token verbalizers and content-free calibration, chosen on dev ----

def _mask_logprobs_by_hand(model, tok, text:str) -> torch.Tensor:
    "Log-probabilities over the vocabulary at the single mask appended to `text`, straight from the model's logits."
    enc = tok(text + " " + tok.mask_token, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return logits[enc["input_ids"][0].tolist().index(tok.mask_token_id)].log_softmax(-1)


def test_cloze_unit_uses_one_token_verbalizers_chosen_on_dev(tiny_release, tmp_path, tiny_mlm):
    data, _ = tiny_release
    d, reg = tiny_mlm
    tok = models.load_tokenizer(models.resolve_model("minilm-demo"))
    r = icl.run_icl_unit("mednli", "tiny-mlm", data, tmp_path, shots=1, limit=4, dev_n=6, registry=reg)
    cloze = r["cloze"]
    # every word scored is ONE WordPiece of this tokenizer; "entailment" (three pieces) is left out, not penalised
    for word in cloze["verbalizers"].values():
        assert len(tok.tokenize(" " + word)) == 1 and tok.tokenize(word) != [tok.unk_token]
    assert cloze["rejected"]["entailment"]["entailment"] == f"{len(tok.tokenize('entailment'))} pieces"
    assert len(tok.tokenize("entailment")) > 1 and "entailment" not in cloze["candidates"]["entailment"]
    assert cloze["verbalizers"]["entailment"] in ("yes", "true")
    # the choice is the best dev value over every set and calibration of the chosen template
    assert cloze["calibration"] in ("none", "content_free") and cloze["content_free_input"] == "N/A"
    best = max(v for values in cloze["dev_scores"].values() for v in values.values())
    chosen = "/".join(cloze["verbalizers"][k] for k in ("entailment", "neutral", "contradiction"))
    template_score = r["template"]["scores"][r["template"]["template"]]
    assert cloze["dev_scores"][cloze["calibration"]][chosen] == best == template_score
    assert r["paper_protocol"] == {"applicable": False, "reason": icl.NO_PAPER_PROTOCOL}


def test_content_free_calibration_removes_an_answer_bias(tiny_release, tiny_mlm):
    "A bias toward one answer word fools the raw scores; Zhao et al.'s calibration cancels it exactly (by hand)."
    from transformers import AutoModelForMaskedLM
    from clinical_repro import prompts
    from clinical_repro.data import blind
    d, _ = tiny_mlm
    tok = models.load_tokenizer(models.resolve_model("minilm-demo"))
    prompt_set = prompts.load_prompts("mednli")
    records = load_task(tiny_release[0], "mednli").splits["dev"][:6]
    words = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
    predicted = {}
    for bias in (0.0, 12.0):
        model = AutoModelForMaskedLM.from_pretrained(d)
        with torch.no_grad():
            model.cls.predictions.bias[tok.convert_tokens_to_ids("yes")] += bias   # every mask now says "yes"
        predictor = icl.TemplatePredictor("mednli", model, tok, prompt_set, records[:1], icl.NoteWindows([], 256),
                                          verbalizers=icl.cloze_verbalizers(
                                              icl.verbalizer_candidates("mednli", prompt_set), tok))
        for calibration in ("none", "content_free"):
            predictor.use_cloze(words, calibration)
            out = predictor.predict(prompt_set.template("paper"), blind("mednli", records), icl.NoteWindows([], 256))
            predicted[bias, calibration] = list(out["rank"].values())
        # the calibrated ranking by hand: log p(word | x) - log p(word | the prompt with "N/A" in every field)
        no_windows = icl.NoteWindows([], 256)
        texts = [b.text for b in icl._build_prompts("mednli", predictor.prompt_set, prompt_set.template("paper"),
                                                     records[:1], blind("mednli", records), no_windows, no_windows,
                                                     predictor.count, predictor.budget, 8)]
        content_free = predictor._content_free(prompt_set.template("paper"), 8)
        assert "Premise: N/A\nHypothesis: N/A\nAnswer:" in content_free                  # every field: N/A
        assert f"Answer: {words[records[0].label]}\n" in content_free                   # the same exemplar
        ids = [tok.convert_tokens_to_ids(words[label]) for label in MEDNLI_LABELS]
        cf = _mask_logprobs_by_hand(model, tok, content_free)[ids]
        by_hand = [MEDNLI_LABELS[int((_mask_logprobs_by_hand(model, tok, t)[ids] - cf).argmax())] for t in texts]
        assert predicted[bias, "content_free"] == by_hand
    assert predicted[12.0, "none"] == ["entailment"] * 6                         # the bias wins uncalibrated
    assert predicted[12.0, "content_free"] == predicted[0.0, "content_free"]     # and is cancelled calibrated


def test_cloze_unit_without_a_one_token_word_is_not_applicable(tiny_release, tmp_path, tiny_mlm, monkeypatch):
    data, _ = tiny_release
    _, reg = tiny_mlm
    params = tmp_path / "params"
    shutil.copytree(default_params_dir(), params)
    task_file = params / "tasks" / "mednli.yaml"
    task_file.write_text(task_file.read_text().replace('entailment: ["yes", "true"]', "entailment: []"))
    monkeypatch.setenv("CLINICAL_REPRO_PARAMS", str(params))
    r = icl.run_icl_unit("mednli", "tiny-mlm", data, tmp_path / "out", shots=1, limit=3, registry=reg)
    assert r["status"] == "not_applicable"
    assert "no one-token word for entailment (entailment: 3 pieces)" in r["reason"]


# ---- issue 11, item 7: the paper's ICL protocol beside the headline ----

_PAPER_WORDS = {"entailment": ("entailment", "yes", "true"), "contradiction": ("contradiction", "no", "false"),
                "neutral": ("neutral", "maybe", "inconclusive")}


def _paper_label_by_hand(text:str) -> tuple[str, bool]:
    "REFERENCE.md's MedNLI reading, written independently: the first label word or synonym; none found -> neutral."
    tokens = re.findall(r"[a-z]+", text.lower())
    for token in tokens:
        for label, words in _PAPER_WORDS.items():
            if token in words:
                return label, False
    return "neutral", True


_OUTPUTS = ["Yes.", "maybe so", "blorp ###", "No, a contradiction", "entailment", "true", "I cannot tell", "neutral"]


def _scripted(model, tok, prompts, max_new_tokens, batch_size=16):
    "Greedy generation replaced by a fixed script (output i of a call: _OUTPUTS[i mod 8])."
    return [_OUTPUTS[i % len(_OUTPUTS)] for i in range(len(prompts))], 10, 10


def test_paper_protocol_mednli_neutral_fallback(tiny_release, tmp_path, monkeypatch):
    data, _ = tiny_release
    monkeypatch.setattr(icl, "generate", _scripted)
    r = icl.run_icl_unit("mednli", "t5-tiny-demo", data, tmp_path, shots=1, limit=8, template="paper")
    paper = r["paper_protocol"]
    saved = json.loads((tmp_path / r["predictions"]).read_text())["paper_protocol"]
    gold = {x.id: x.label for x in load_task(data, "mednli").splits["test"]}
    read = {i: _paper_label_by_hand(text) for i, text in saved["mednli"]["raw"].items()}
    assert paper["applicable"] and paper["n_test"] == 8 and paper["subset"] is None and paper["template"] == "paper"
    assert paper["test"]["accuracy"] == pytest.approx(np.mean([read[i][0] == gold[i] for i in read]))
    fallbacks = sum(fell for _, fell in read.values())
    assert fallbacks > 0 and paper["fallbacks"] == {"n": 8, "count": fallbacks, "rate": fallbacks / 8}
    assert "neutral" in paper["description"]
    # the headline stays strict: the same outputs, but no label word is a counted failure, never neutral
    assert r["metrics"]["test"]["generate"]["parse_failures"]["failures"] >= fallbacks


def test_paper_protocol_radqa_scores_other_no_answer_words_as_answers(tiny_release, tmp_path, monkeypatch):
    import squad2_reference
    data, _ = tiny_release
    script = ["N/A", "none", "no answer", "the left lung"]
    monkeypatch.setattr(icl, "generate", lambda m, t, prompts, n, b=16: ([script[i % 4] for i in range(len(prompts))],
                                                                          1, 1))
    r = icl.run_icl_unit("radqa", "t5-tiny-demo", data, tmp_path, shots=0, limit=8, template="paper")
    raw = json.loads((tmp_path / r["predictions"]).read_text())["paper_protocol"]["radqa"]["raw"]
    golds = {x.id: x.answer_texts for x in load_task(data, "radqa").splits["test"] if x.id in raw}
    answers = {i: "" if text == "N/A" else text for i, text in raw.items()}     # the paper: N/A -> no answer
    reference = squad2_reference.evaluate(golds, answers, {i: -1.0 for i in golds})
    paper = r["paper_protocol"]
    assert paper["n_test"] == 8 and paper["test"]["exact"] == pytest.approx(reference["exact"])
    assert paper["test"]["f1"] == pytest.approx(reference["f1"]) and "best_f1" not in paper["test"]
    headline = squad2_reference.evaluate(golds, {i: "" if text != "the left lung" else text for i, text in raw.items()})
    assert r["metrics"]["test"]["exact"] == pytest.approx(headline["exact"])   # the headline maps every no-answer word


@pytest.fixture(scope="module")
def clip_unit(tiny_release, tmp_path_factory):
    "One CLIP ICL unit with the tiny T5 (1 shot, 10 test sentences, a dev sample of 7)."
    out = tmp_path_factory.mktemp("clip-icl")
    return icl.run_icl_unit("clip", "t5-tiny-demo", tiny_release[0], out, shots=1, limit=10, dev_n=7), out


def test_paper_protocol_clip_scores_a_quarter_of_whole_notes(tiny_release, clip_unit):
    r, _ = clip_unit
    paper, subset = r["paper_protocol"], r["paper_protocol"]["subset"]
    test = {x.id: x for x in load_task(tiny_release[0], "clip").splits["test"]}
    notes = sorted({test[i].doc_id for i in _unit_test_ids(clip_unit)})
    assert subset["unit"] == "note" and subset["fraction"] == 0.25 and subset["of_notes"] == len(notes)
    assert subset["n_notes"] == max(1, round(0.25 * len(notes))) and set(subset["note_ids"]) <= set(notes)
    # whole notes: every queried sentence of a chosen note, and nothing else
    expected = [i for i in _unit_test_ids(clip_unit) if test[i].doc_id in set(subset["note_ids"])]
    assert paper["n_test"] == subset["n_items"] == len(expected)
    assert paper["primary_variant"] == "per_label" and set(paper["variants"]) == {"per_label", "list"}
    assert paper["test"] == paper["variants"]["per_label"] and "headline_on_subset" in paper
    # the same notes for another unit (the subset is seeded, not the unit's)
    again = icl.paper_subset("clip", [test[i] for i in _unit_test_ids(clip_unit)], 0.25)[1]
    assert again["note_ids"] == subset["note_ids"]


def _unit_test_ids(clip_unit) -> list:
    r, out = clip_unit
    test = json.loads((out / r["predictions"]).read_text())["test"]
    return list(test["per_label"]["labels"])


# ---- issue 11, item 8: budgets, exemplars kept, the CLIP dev sample ----

def test_t5_budget_keeps_exemplars_that_512_tokens_would_drop(tiny_t5):
    from clinical_repro import prompts
    from clinical_repro.data import NLIRecord, blind
    tok, model = tiny_t5
    sentence = "the patient was seen in clinic and reported chest pain"     # 10 words
    exemplars = [NLIRecord(f"e{i}", " ".join([sentence] * 12), "the patient has pain", "entailment") for i in range(3)]
    queries = blind("mednli", [NLIRecord("q0", " ".join([sentence] * 45), "afebrile", "neutral")])
    assert 400 < len(tok(" ".join([sentence] * 45))["input_ids"]) < 500     # the query alone nearly fills 512
    prompt_set = prompts.load_prompts("mednli")
    kept = {}
    from clinical_repro.tasks import icl_budget
    for budget in (None, icl_budget("seq2seq")):
        predictor = icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars, icl.NoteWindows([], 256),
                                          budget=budget)
        predictor.predict(prompt_set.template("paper"), queries, icl.NoteWindows([], 256))
        kept[budget] = predictor.exemplars_kept(3)["test"]
    assert icl_budget("seq2seq") == 1024 and kept[1024] == {"prompts": 1, "mean": 3.0, "min": 3, "max": 3}
    assert kept[None]["max"] < 3    # the model's 512 (T5's pre-training length) drops some
    assert tok.model_max_length == 512


def test_exemplars_kept_are_summarised_over_the_test_prompts(tiny_release, tmp_path):
    data, _ = tiny_release
    r = icl.run_icl_unit("radqa", "t5-tiny-demo", data, tmp_path, shots=2, limit=5, dev_n=3, template="paper")
    kept = r["exemplars_kept"]
    assert kept["shots"] == 2 and kept["test"]["prompts"] == 5 and 0 <= kept["test"]["min"] <= kept["test"]["max"] <= 2
    assert kept["test"]["min"] <= kept["test"]["mean"] <= kept["test"]["max"]
    assert kept["dev"]["prompts"] == 0 and r["counts"]["dev_sample"] == 0   # a fixed template: no dev pass
    assert r["config"]["budget"] == r["truncation"]["budget"] == 1024


def test_clip_template_choice_uses_a_dev_sample_with_positives_of_every_label(tiny_release, clip_unit):
    r, _ = clip_unit
    draw = r["dev_sample_draw"]
    dev = {x.id: x for x in load_task(tiny_release[0], "clip").splits["dev"]}
    assert draw["method"] == "per_label_quota" and draw["n"] == len(draw["ids"]) == r["counts"]["dev_sample"] == 7
    for label in CLIP_LABELS:
        has_positives = any(label in x.labels for x in dev.values())
        in_sample = sum(label in dev[i].labels for i in draw["ids"])
        assert in_sample == draw["positives"][label] and in_sample >= int(has_positives), label


def test_seq2seq_and_encoder_prompts_stay_one_text(tiny_release, mednli_three_shot, tiny_t5):
    "Only decoders read chat turns: a seq2seq model reads the built text as it is; the layout is in the run_id."
    from clinical_repro import prompts
    from clinical_repro.identity import icl_identity
    tok, model = tiny_t5
    data, _ = tiny_release
    task_data, prompt_set, template, exemplars = mednli_three_shot
    queries = task_data.splits["test"][:2]
    predictor = icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars, icl.NoteWindows([], 0))
    assert predictor.layout == "text"
    shown = [prompts.record_fields(e, prompt_set, template) for e in exemplars]
    by_hand = [template.separator.join([template.instruction, *(template.example.format(**s) for s in shown),
                                        template.query.format(**prompts.record_fields(q, prompt_set, template,
                                                                                      answer=False))])
               for q in queries]
    assert predictor._texts(template, queries, icl.NoteWindows([], 0), 8) == by_hand
    with pytest.raises(UserError, match="expected one of text"):
        icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars, icl.NoteWindows([], 0), layout="chat_turns")
    config = icl_identity("mednli", "t5-tiny-demo", data, shots=1)[0]
    assert config["prompt_layout"] == "text"
    assert icl_identity("mednli", "minilm-demo", data, shots=1)[0]["prompt_layout"] == "text"
