"""Decoders (PubMedGPT / BioMedLM, GPT-2 style) on all three tasks. A tiny random GPT-2 with BioMedLM's special tokens
(bos = eos = unk = <|endoftext|>, no pad; a byte-level BPE vocabulary trained here on the synthetic text) stands in
for the real weights: placed in a private Hugging Face cache under BioMedLM's hub id, it is what the `pubmedgpt`
registry entry loads, so the CLI runs the entry exactly as a user would (learning rate, memory settings). The
adapters put labelled separators between the fields, the classifier reads the last real token of a right-padded
batch, and RadQA's null answer sits at the bos position and scores as no-answer."""
import json, os

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from clinical_repro import inputs, metrics, models, qa
from clinical_repro.config import resolve_train
from clinical_repro.core import UserError
from clinical_repro.data import load_task
from clinical_repro.train import make_collator
from conftest import TASK_METRICS, place_in_hub_cache, save_random_model, synthetic_texts, train_byte_level_bpe

EOT = "<|endoftext|>"
HUB_ID = "stanford-crfm/BioMedLM"


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)


def build_tiny_biomedlm(folder, texts:list[str], seed:int=0) -> None:
    "A tiny random GPT-2 language model with BioMedLM's special tokens and a byte-level BPE tokenizer, in `folder`."
    train_byte_level_bpe(folder, texts, [EOT])
    tokenizer = GPT2Tokenizer.from_pretrained(folder)   # bos = eos = unk = <|endoftext|>, no pad: BioMedLM's
    tokenizer.save_pretrained(folder)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eot, eos_token_id=eot)
    save_random_model(GPT2LMHeadModel, config, folder, seed)


@pytest.fixture(scope="module")
def tiny_biomedlm(tiny_release, tmp_path_factory):
    "The tiny model's folder."
    folder = tmp_path_factory.mktemp("tiny-biomedlm")/"model"
    build_tiny_biomedlm(folder, synthetic_texts(tiny_release[0]))
    return folder


@pytest.fixture(scope="module")
def hub_cache(tiny_biomedlm, tmp_path_factory):
    "A private Hugging Face cache holding the tiny model as BioMedLM's hub id (what an offline run looks up)."
    root = tmp_path_factory.mktemp("hub")
    place_in_hub_cache(root, HUB_ID, tiny_biomedlm)
    return root


@pytest.fixture(scope="module")
def resolved(tiny_biomedlm):
    "The pubmedgpt registry entry bound to the tiny model's folder."
    return models.ResolvedModel("pubmedgpt", models.load_registry()["pubmedgpt"], str(tiny_biomedlm), True)


@pytest.fixture(scope="module")
def tokenizer(resolved):
    return models.load_tokenizer(resolved)


# ---- the registry: the paper's rate and the memory settings ----------------------------------------------------------

def test_pubmedgpt_and_t5_xl_carry_the_paper_rate_and_the_memory_settings():
    registry = models.load_registry()
    for task in ("mednli", "radqa", "clip"):
        spec = resolve_train(task, "decoder", "pubmedgpt", registry["pubmedgpt"].train)
        assert (spec.optimizer, spec.learning_rate, spec.epochs) == ("adamw", 2e-6, 20)
        assert spec.gradient_checkpointing is True
        t5_xl = resolve_train(task, "seq2seq", "t5-3b", registry["t5-3b"].train)
        assert (t5_xl.optimizer, t5_xl.gradient_checkpointing) == ("adafactor", True)
    encoder = resolve_train("mednli", "encoder", "roberta-large", registry["roberta-large"].train)
    assert encoder.gradient_checkpointing is False   # the default: small models do not pay for recomputation


# ---- the adapters --------------------------------------------------------------------------------------------------

def test_the_tokenizer_is_biomedlm_like(tokenizer):
    "bos = eos = unk, no [CLS]/[SEP]; the loader pads with eos, on the right."
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == EOT
    assert tokenizer.cls_token is None and tokenizer.sep_token is None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "right"


def test_a_decoder_without_a_pad_token_cannot_be_batched(tiny_biomedlm):
    "The raw tokenizer (no pad, as BioMedLM ships it) is refused; `models.load_tokenizer` is what gives it one."
    with pytest.raises(UserError, match="needs a pad token"):
        make_collator("decoder", GPT2Tokenizer.from_pretrained(tiny_biomedlm))


def test_mednli_pairs_are_separated_and_end_on_the_cue(tiny_release, tokenizer):
    records = load_task(tiny_release[0], "mednli").splits["dev"][:5]
    features = inputs.mednli_encoder_features(tokenizer, records, max_length=256)
    for record, ids in zip(records, features["input_ids"]):
        text = tokenizer.decode(ids)
        assert text == f"{EOT}premise: {record.premise}\nhypothesis: {record.hypothesis}\nanswer:"
        assert ids[-1] != tokenizer.pad_token_id   # the read-out token is never taken for padding


def test_clip_sentences_keep_their_place_in_the_window(tiny_release, tokenizer):
    notes = load_task(tiny_release[0], "clip").notes["dev"][:2]
    features = inputs.clip_encoder_features(tokenizer, notes, window_tokens=48)
    sentences = [s for note in notes for s in note.sentences]
    assert features["item_id"] == [s.id for s in sentences] and max(features["length"]) <= 48
    for sentence, ids, labels in zip(sentences, features["input_ids"], features["labels"]):
        text = tokenizer.decode(ids)
        assert text.startswith(f"{EOT}sentence: ") and "\ncontext:" in text and " [sentence]" in text
        assert text.endswith("\nanswer:") and labels == inputs.clip_multi_hot(sentence.labels)


def test_classification_reads_the_last_real_token_of_a_right_padded_batch(tiny_release, resolved, tokenizer):
    "Batched logits equal each item's logits alone, and the score head applied to its last real token's state."
    model = models.load_model(resolved, "sequence-classification", num_labels=3).eval()
    assert model.config.pad_token_id == tokenizer.eos_token_id
    records = load_task(tiny_release[0], "mednli").splits["dev"][:4]
    features = inputs.mednli_encoder_features(tokenizer, records, max_length=256)
    lengths = features["length"]
    assert len(set(lengths)) > 1   # the batch needs padding
    rows = [{"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    batch = make_collator("decoder", tokenizer)(rows)
    assert (batch["input_ids"][0, lengths[0]:] == tokenizer.pad_token_id).all()   # padded on the right
    with torch.no_grad():
        batched = model(**batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in features["input_ids"]])
        states = model.transformer(**batch).last_hidden_state
        by_hand = model.score(states[torch.arange(len(lengths)), torch.tensor(lengths) - 1])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched, by_hand)


def test_a_radqa_null_answer_is_predicted_at_bos_and_scored_as_no_answer(tiny_release, tokenizer):
    records = load_task(tiny_release[0], "radqa").splits["dev"]
    unanswerable = next(r for r in records if not r.answerable)
    answerable = next(r for r in records if r.answerable)
    pair = [unanswerable, answerable]
    train = qa.qa_features(tokenizer, pair, max_length=512, doc_stride=128, train=True)
    evaluation = qa.qa_features(tokenizer, pair, max_length=512, doc_stride=128, train=False)
    assert all(ids[0] == tokenizer.bos_token_id for ids in train["input_ids"])
    windows = [i for i, x in enumerate(train["example_index"]) if x == 0]
    assert {(train["start_positions"][i], train["end_positions"][i]) for i in windows} == {(0, 0)}
    # a model that points at the labels (the null position for the unanswerable one), over small noise
    rng = np.random.default_rng(0)
    starts = [rng.normal(0, 0.1, len(ids)) for ids in train["input_ids"]]
    ends = [rng.normal(0, 0.1, len(ids)) for ids in train["input_ids"]]
    for i, (start, end) in enumerate(zip(train["start_positions"], train["end_positions"])):
        starts[i][start] += 10
        ends[i][end] += 10
    predictions, no_answer = qa.postprocess_qa(pair, evaluation, starts, ends, max_answer_tokens=512)
    assert no_answer[unanswerable.id] > 0 > no_answer[answerable.id]
    final = metrics.apply_no_answer_threshold(predictions, no_answer, 0.0)
    assert final == {unanswerable.id: "", answerable.id: answerable.answers[0][0].strip()}
    scores = metrics.squad_v2_scores({r.id: r.answer_texts for r in pair}, final)
    assert (scores["NoAns_exact"], scores["HasAns_exact"], scores["exact"]) == (100.0, 100.0, 100.0)


# ---- end to end: the CLI, the registry entry, every task -----------------------------------------------------------

@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_pubmedgpt_finetunes_on_every_task_from_the_cli(task, tiny_release, hub_cache, tmp_path, run_cli):
    out = tmp_path/"out"
    done = run_cli("finetune", "--task", task, "--model", "pubmedgpt", "--data-dir", tiny_release[0], "--out", out,
                   "--max-steps", "2", "--set", "train.effective_batch=16", "--json",
                   env={"HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok" and summary["model"] == "pubmedgpt"
    result = json.loads((out/f"{summary['run_id']}.json").read_text())   # the results file
    assert result["status"] == "ok" and result["config"]["family"] == "decoder"
    train = result["config"]["train"]
    assert (train["learning_rate"], train["optimizer"], train["gradient_checkpointing"]) == (2e-6, "adamw", True)
    assert TASK_METRICS[task] <= set(result["metrics"]["test"])
    assert result["cost"]["optimizer_steps"] == 2
    if task == "radqa":
        assert "no_answer_threshold" in result["thresholds"]
    predictions = result["predictions"]
    assert os.path.isfile(predictions if os.path.isabs(predictions) else out/predictions)
