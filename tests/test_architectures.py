"""The encoders' architectures through their real registry entries (issue 13, "Tests (offline)"): BERT
(`bioclinicalbert`), RoBERTa (`roberta-large`), Megatron-BERT (`gatortron`, a cased vocabulary) and Longformer
(`clinical-longformer`). For each, a tiny random model built from its transformers config class, with a tokenizer
trained here on the synthetic text (WordPiece for the BERTs, byte-level BPE for RoBERTa and Longformer) and shipped
as those checkpoints ship (a vocabulary and a config, no tokenizer_config), sits in a private Hugging Face cache
under the entry's hub id; `clinical-repro finetune` (its `main`, in this process) then loads it offline exactly as a
user's run would, on every task. (GPT-2 with BioMedLM's tokens: tests/test_decoders.py; T5:
tests/test_models_facts.py.)"""
import json

import pytest
from tokenizers import BertWordPieceTokenizer
from transformers import (BertConfig, BertForMaskedLM, LongformerConfig, LongformerForMaskedLM, MegatronBertConfig,
                          MegatronBertForMaskedLM, RobertaConfig, RobertaForMaskedLM)

from clinical_repro import models
from clinical_repro.data import load_task
from clinical_repro.governance import network_guard_env
from conftest import TASK_METRICS, place_in_hub_cache, save_random_model, synthetic_texts, train_byte_level_bpe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # ids 0-4: RoBERTa's, and its config's defaults
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# RadQA windows are 512 tokens; RoBERTa-style positions start after the pad index, hence 514.
ARCHITECTURES = {   # registry entry: (vocabulary, config class, model class, settings beyond TINY)
    "bioclinicalbert": ("wordpiece", BertConfig, BertForMaskedLM, {"max_position_embeddings": 512}),
    "gatortron": ("wordpiece", MegatronBertConfig, MegatronBertForMaskedLM, {"max_position_embeddings": 512}),
    "roberta-large": ("bpe", RobertaConfig, RobertaForMaskedLM, {"max_position_embeddings": 514, "type_vocab_size": 1}),
    # attention_window: even, one per layer; inputs are padded to a multiple of it
    "clinical-longformer": ("bpe", LongformerConfig, LongformerForMaskedLM,
                            {"max_position_embeddings": 514, "type_vocab_size": 1, "attention_window": 16}),
}


def _vocabulary(folder, kind:str, texts:list[str]) -> int:
    "Train the tokenizer's vocabulary into `folder`; its size."
    if kind == "bpe":
        train_byte_level_bpe(folder, texts, BPE_SPECIALS)
        return len(json.loads((folder / "vocab.json").read_text()))
    wordpiece = BertWordPieceTokenizer(lowercase=False)   # cased, as GatorTron's (and BioBERT's) vocabularies are
    wordpiece.train_from_iterator(texts, vocab_size=1000, special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    folder.mkdir(parents=True)
    wordpiece.save_model(str(folder))
    return len((folder / "vocab.txt").read_text().splitlines())


def build_tiny_encoder(folder, name:str, texts:list[str], seed:int=0) -> None:
    "A tiny random masked-LM of `name`'s architecture with a vocabulary trained on `texts`, in `folder`."
    kind, config_class, model_class, settings = ARCHITECTURES[name]
    config = config_class(vocab_size=_vocabulary(folder, kind, texts), **TINY, **settings)
    save_random_model(model_class, config, folder, seed)


@pytest.fixture(scope="module")
def hub_cache(tiny_release, tmp_path_factory):
    "A private Hugging Face cache holding one tiny model per architecture, each under its registry entry's hub id."
    registry = models.load_registry()
    texts = synthetic_texts(tiny_release[0])
    built, cache = tmp_path_factory.mktemp("tiny-encoders"), tmp_path_factory.mktemp("hub")
    for name in ARCHITECTURES:
        build_tiny_encoder(built / name, name, texts)
        place_in_hub_cache(cache, registry[name].hub_id, built / name)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    "This process reads the private cache, offline (huggingface_hub read HF_HUB_CACHE when it was imported)."
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    for name, value in network_guard_env(offline=True).items():   # as a `clinical-repro` subprocess gets them
        monkeypatch.setenv(name, value)
    return hub_cache


def _words(tokens:list[str]) -> str:
    "WordPiece tokens glued back together, white space dropped."
    return "".join(token.removeprefix("##") for token in tokens)


def test_gatortron_reads_text_cased_where_clinicalbert_lower_cases(tiny_release, offline_hub):
    "Both entries load the same kind of cased vocabulary from the cache; only GatorTron's registry entry keeps case."
    mednli = load_task(tiny_release[0], "mednli").splits["dev"]
    sentence = next(r.premise for r in mednli if any(c.isupper() for c in r.premise))
    gatortron = models.load_tokenizer(models.resolve_model("gatortron"))
    assert type(gatortron).__name__.startswith("Bert") and gatortron.do_lower_case is False
    assert _words(gatortron.tokenize(sentence)) == "".join(sentence.split())
    clinicalbert = models.load_tokenizer(models.resolve_model("bioclinicalbert"))   # BertTokenizer's default
    assert _words(clinicalbert.tokenize(sentence)) == "".join(sentence.lower().split())


@pytest.mark.parametrize("name,expected", [("bioclinicalbert", "BertForSequenceClassification"),
                                           ("gatortron", "MegatronBertForSequenceClassification"),
                                           ("roberta-large", "RobertaForSequenceClassification"),
                                           ("clinical-longformer", "LongformerForSequenceClassification")])
def test_each_entry_loads_its_architecture_from_the_cache(name, expected, offline_hub):
    model = models.load_model(models.resolve_model(name), "sequence-classification", num_labels=3)
    assert type(model).__name__ == expected and model.config.hidden_size == TINY["hidden_size"]


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_finetunes_on_every_task_from_the_cli(name, task, tiny_release, offline_hub, tmp_path,
                                                                 run_main):
    "The command in this process (a subprocess's start-up would double the time), reading the private cache."
    out = tmp_path / "out"
    exit_code, stdout, _ = run_main("finetune", "--task", task, "--model", name, "--data-dir", tiny_release[0],
                                    "--out", out, "--max-steps", "2", "--set", "train.effective_batch=8", "--json")
    assert exit_code == 0
    summary = json.loads(stdout)
    assert summary["status"] == "ok" and summary["model"] == name
    result = json.loads((out / f"{summary['run_id']}.json").read_text())   # the results file
    assert result["status"] == "ok" and result["config"]["family"] == "encoder"
    assert TASK_METRICS[task] <= set(result["metrics"]["test"])
    assert result["cost"]["optimizer_steps"] == 2
    assert result["config"]["model_source"] == models.load_registry()[name].hub_id   # the cached tiny model
    cased = {"do_lower_case": False} if name == "gatortron" else {}
    assert result["config"]["inputs"]["tokenizer"] == cased
