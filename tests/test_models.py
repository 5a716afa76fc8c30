"""The model registry, name resolution, the offline demo models, task heads and the precision policy."""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clinical_repro import models
from clinical_repro.core import DataError, UserError
from clinical_repro.grid import grid_path, load_grid
from clinical_repro.models import (BUILTINS, ModelSpec, build_minilm_random_demo, build_t5_tiny_demo,
                                   choose_precision, device_info, load_model,
                                   load_registry, load_tokenizer, minilm_demo_dir, resolve_model)

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "params" / "models.yaml"

# name -> (family, domain, size in millions), typed from REFERENCE.md (paper Table 1 and appendix);
# roberta-base is the mission's and has 125M parameters (RoBERTa paper).
EXPECTED = {
    "bioclinicalbert": ("encoder", "clinical", 110),
    "bert-base": ("encoder", "general", 110),   # ClinicalBERT's general counterpart (compare pairs), not in the paper
    "roberta-base": ("encoder", "general", 125),
    "roberta-large": ("encoder", "general", 345),
    "bioclinroberta": ("encoder", "clinical", 345),
    "gatortron": ("encoder", "clinical", 345),
    "clinical-longformer": ("encoder", "clinical", 150),
    "t5-base": ("seq2seq", "general", 220),
    "t5-large": ("seq2seq", "general", 770),
    "t5-3b": ("seq2seq", "general", 3000),
    "clinical-t5-base": ("seq2seq", "clinical", 220),
    "clinical-t5-base-ckpt": ("seq2seq", "clinical", 220),
    "clinical-t5-large": ("seq2seq", "clinical", 770),
    "scifive": ("seq2seq", "biomedical", 220),
    "flan-t5-xxl": ("seq2seq", "general", 11000),
    "pubmedgpt": ("decoder", "biomedical", 2700),
}
LOCAL = {"clinical-t5-base": "CLINICAL_T5_BASE", "clinical-t5-base-ckpt": "CLINICAL_T5_BASE_CKPT",
         "clinical-t5-large": "CLINICAL_T5_LARGE", "bioclinroberta": "BIOCLINROBERTA"}
TEXTS = ["The patient denies chest pain.", "Follow up with cardiology in two weeks for a repeat echo."]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    "No hub, a private cache for built demo models, no stray model-path variables."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLINICAL_REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLINICAL_REPRO_PARAMS", raising=False)
    for var in LOCAL.values(): monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def registry():
    return load_registry(REGISTRY)


def _state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- registry

def test_registry_has_the_papers_and_missions_models(registry):
    for name, (family, domain, size) in EXPECTED.items():
        spec = registry[name]
        assert (spec.family, spec.domain, spec.size_m) == (family, domain, size), name
    llms = set(load_grid(grid_path("llm-icl")).icl.models)   # the local LLMs in context: not in the paper
    assert {n for n, s in registry.items() if s.builtin is None} == set(EXPECTED) | llms
    assert {n: s.builtin for n, s in registry.items() if s.builtin is not None} == {b: b for b in BUILTINS}
    assert load_registry() == registry  # the default path is the repository's params/models.yaml


def test_registry_sources_and_protocol(registry):
    # remote API: out of scope
    assert not any("gpt-3" in n or "gpt-3" in s.paper_name.lower() for n, s in registry.items())
    for name, spec in registry.items():
        assert sum(x is not None for x in (spec.hub_id, spec.local_path, spec.builtin)) == 1, name
    for name, var in LOCAL.items(): assert registry[name].env_vars == [var]
    assert registry["gatortron"].hub_id == "UFNLP/gatortron-base"
    assert registry["pubmedgpt"].hub_id == "stanford-crfm/BioMedLM"
    assert (registry["minilm-demo"].builtin, registry["t5-tiny-demo"].builtin) == ("minilm-demo", "t5-tiny-demo")
    assert registry["flan-t5-xxl"].modes == ("icl",)
    assert registry["smollm2-demo"].modes == ("icl",)   # the demo's instruction-tuned LLM: ICL only
    in_context_only = {"flan-t5-xxl", "smollm2-demo", *load_grid(grid_path("llm-icl")).icl.models}
    assert all("finetune" in s.modes for n, s in registry.items() if n not in in_context_only)
    assert all(registry[n].modes == ("icl",) for n in in_context_only)
    assert registry["bioclinicalbert"].has_mlm_head and not registry["minilm-demo"].has_mlm_head
    # REFERENCE.md, "Fine-tuning protocol"
    for name in ("roberta-large", "bioclinroberta"):
        assert registry[name].train == {"optimizer": "adamw", "learning_rate": 1e-5}
    for name in ("bioclinicalbert", "gatortron"):
        t = registry[name].train
        assert (t["optimizer"], t["learning_rate"], t["learning_rate_grid"]) == ("adamw", 2e-5, [2e-5, 3e-5, 5e-5])
    for name in ("t5-base", "t5-large", "t5-3b", "clinical-t5-base", "clinical-t5-base-ckpt", "clinical-t5-large",
                 "scifive"):
        recipe = {key: registry[name].train.get(key) for key in ("optimizer", "learning_rate", "lr_scheduler")}
        assert recipe == {"optimizer": "adafactor", "learning_rate": 1e-4, "lr_scheduler": "constant"}, name
    # epochs per task and model: resolved through the config module in nbs/10_config.ipynb (resolve_train)


def test_spec_is_frozen(registry):
    with pytest.raises(Exception): registry["gatortron"].family = "seq2seq"


def _write_copy(tmp_path, edit) -> Path:
    p = tmp_path / "models.yaml"
    p.write_text(edit(REGISTRY.read_text()))
    return p


def test_unknown_key_names_file_and_key_path(tmp_path):
    p = _write_copy(tmp_path,
                    lambda s: s.replace("  paper_name: GatorTron\n", "  paper_name: GatorTron\n  famly: encoder\n"))
    with pytest.raises(DataError) as e: load_registry(p)
    assert f"{p}: gatortron.famly: unknown key" in str(e.value)
    assert len(e.value.problems) == 1


def test_bad_values_are_all_reported(tmp_path):
    p = _write_copy(tmp_path, lambda s: s.replace("family: decoder", "family: decodr")
                    .replace("size_m: 110", "size_m: -1").replace("train: {}", "train: [a, b]"))
    with pytest.raises(UserError) as e: load_registry(p)
    msg = str(e.value)
    assert "pubmedgpt.family" in msg and "'decodr'" in msg
    assert "bioclinicalbert.size_m" in msg
    assert "flan-t5-xxl.train" in msg


def test_two_sources_duplicates_and_syntax(tmp_path):
    p = _write_copy(tmp_path, lambda s: s.replace("  hub_id: t5-large\n", "  hub_id: t5-large\n  local_path: /x\n"))
    with pytest.raises(UserError, match="t5-large: exactly one of hub_id, local_path, builtin"): load_registry(p)
    p.write_text(REGISTRY.read_text() + "\ngatortron:\n  paper_name: again\n")
    with pytest.raises(UserError, match="duplicate key 'gatortron'"): load_registry(p)
    p.write_text("a-model:\n  paper_name: [unclosed\n")
    with pytest.raises(UserError, match=r"line \d+: valid YAML"): load_registry(p)
    p.write_text("Bad_Name:\n  paper_name: x\n")
    with pytest.raises(UserError, match="Bad_Name: model names are lowercase kebab case"): load_registry(p)


# ---------------------------------------------------------------- resolving names

def test_unknown_name_lists_what_exists(registry):
    with pytest.raises(UserError) as e: resolve_model("gpt-3", registry)
    for name in registry: assert name in str(e.value)
    with pytest.raises(UserError, match="did you mean 'gatortron'"): resolve_model("gatortorn", registry)


def test_missing_local_path_names_env_var_and_path(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as e: resolve_model("clinical-t5-large", registry)
    msg = str(e.value)
    assert "CLINICAL_T5_LARGE" in msg and str(tmp_path / "home" / "models" / "clinical-t5-large") in msg
    assert "Clinical-T5 weights (one-time conversion)" in msg
    folder = tmp_path / "ct5"
    folder.mkdir()
    monkeypatch.setenv("CLINICAL_T5_BASE", str(folder))
    with pytest.raises(UserError, match=f"without config.json at {folder}"): resolve_model("clinical-t5-base", registry)
    (folder / "config.json").write_text("{}")
    r = resolve_model("clinical-t5-base", registry)
    assert (r.source, r.offline) == (str(folder), True)


def test_hub_ids_follow_hf_hub_offline(registry, monkeypatch):
    r = resolve_model("roberta-large", registry)
    assert (r.source, r.offline) == ("roberta-large", True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("roberta-large", registry).offline is False


def test_uncached_hub_model_offline_is_a_clear_error(registry):
    spec = registry["roberta-base"].model_copy(update={"hub_id": "clinical-repro-test/not-a-model"})
    r = resolve_model("ghost", {"ghost": spec})
    with pytest.raises(UserError, match="Offline"): load_tokenizer(r)
    with pytest.raises(UserError, match="Offline"): load_model(r, "sequence-classification", num_labels=3)


# A fresh process for each: huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and its timeouts when imported.
# HF_ENDPOINT at a closed port stands for a hub that cannot be reached (deterministic, no network needed).
_LOAD_IN_A_FRESH_PROCESS = """
import json, sys, time
from clinical_repro.core import UserError
from clinical_repro.models import load_model, load_registry, resolve_model
spec = load_registry()["roberta-base"].model_copy(update={"hub_id": sys.argv[1]})
resolved = resolve_model("hub-model", {"hub-model": spec})
start = time.perf_counter()
try:
    load_model(resolved, "sequence-classification", num_labels=2)
    error = None
except UserError as e:
    error = str(e)
import huggingface_hub.constants as hub
print(json.dumps({"error": error, "seconds": round(time.perf_counter() - start, 2),
                  "etag_timeout": hub.HF_HUB_ETAG_TIMEOUT, "transformers_imported": "transformers" in sys.modules}))
"""


def _load_in_a_fresh_process(hub_id: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "HF_HUB_ETAG_TIMEOUT", "HF_HOME")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, hub_id], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{hub_id}: {outcome['seconds']} s")   # the measured time, for the record (no timed assertion)
    return outcome


def test_unreachable_hub_model_is_refused_before_transformers_with_the_remedy(tmp_path):
    "Not cached, hub unreachable: refused before transformers is imported, saying the two ways out."
    outcome = _load_in_a_fresh_process("clinical-repro-test/not-a-model", tmp_path / "hub")
    error = outcome["error"]
    assert error.startswith("model 'hub-model': hub id clinical-repro-test/not-a-model is not in the Hugging Face "
                            "cache and the hub at http://127.0.0.1:9 cannot be reached"), error
    assert "set HF_HUB_OFFLINE=1" in error and "hf download clinical-repro-test/not-a-model" in error
    assert "replace `hub_id: clinical-repro-test/not-a-model` of hub-model by `local_path:" in error
    assert outcome["transformers_imported"] is False   # no retries: transformers was never asked
    assert outcome["etag_timeout"] == 5                 # huggingface_hub's own metadata timeout, shortened


def test_cached_hub_model_loads_while_the_hub_is_unreachable(tmp_path):
    "config.json and weights in the Hugging Face cache: the model loads from there, the hub unreachable."
    from transformers import BertConfig, BertModel
    snapshot = tmp_path / "hub" / "models--clinical-repro-test--tiny-bert" / "snapshots" / "abc123"
    (snapshot.parents[1] / "refs").mkdir(parents=True)
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    BertModel(config).save_pretrained(snapshot)
    outcome = _load_in_a_fresh_process("clinical-repro-test/tiny-bert", tmp_path / "hub")
    assert outcome["error"] is None and outcome["transformers_imported"]


def test_offline_uncached_error_gives_the_remedy(registry):
    spec = registry["roberta-base"].model_copy(update={"hub_id": "clinical-repro-test/not-a-model"})
    r = resolve_model("ghost", {"ghost": spec})
    with pytest.raises(UserError) as e: load_tokenizer(r)
    assert "config.json is not in the Hugging Face cache" in str(e.value)
    assert "set HF_HUB_OFFLINE=1" in str(e.value) and "by `local_path: /path/to/the/folder`" in str(e.value)


# ---------------------------------------------------------------- minilm-demo

def test_minilm_demo_is_the_packaged_encoder_without_its_stale_pooler(registry):
    "Every encoder tensor is the package's; the pooler sentence-transformers never trained is dropped: it starts fresh."
    r = resolve_model("minilm-demo", registry)
    assert r.offline and Path(r.source) != minilm_demo_dir()
    shipped = load_file(str(minilm_demo_dir() / "model.safetensors"))
    built = load_file(str(Path(r.source) / "model.safetensors"))
    assert set(shipped) - set(built) == {"pooler.dense.weight", "pooler.dense.bias"} and set(built) <= set(shipped)
    assert all(torch.equal(built[key], shipped[key]) for key in built)
    model = load_model(r, "sequence-classification", num_labels=3)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, shipped["embeddings.word_embeddings.weight"])
    fresh = model.bert.pooler.dense.weight
    assert not torch.equal(fresh, shipped["pooler.dense.weight"])
    assert abs(fresh.std().item() - model.config.initializer_range) < 0.002   # BERT's initialisation, not the leftover


def test_minilm_demo_heads_forward(registry):
    r = resolve_model("minilm-demo", registry)
    tok = load_tokenizer(r)
    assert tok.vocab_size == 30522 and tok.pad_token_id == 0
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    n, length = batch["input_ids"].shape

    clf = load_model(r, "sequence-classification", num_labels=3).eval()
    with torch.no_grad(): out = clf(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (n, 3)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 2])))

    qa = load_model(r, "question-answering").eval()
    pair = tok(["Is there an effusion?"], ["Small left pleural effusion."], return_tensors="pt")
    with torch.no_grad(): out = qa(**pair)
    assert out.start_logits.shape == out.end_logits.shape == pair["input_ids"].shape

    ml = load_model(r, "sequence-classification", num_labels=7, problem_type="multi_label_classification").eval()
    assert ml.config.problem_type == "multi_label_classification"
    y = torch.zeros(n, 7)
    y[1, [0, 4]] = 1
    with torch.no_grad(): out = ml(**batch, labels=y)
    assert out.logits.shape == (n, 7)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, y))  # per-label BCE, not softmax


def test_heads_that_do_not_fit_the_family_are_refused(registry):
    mini = resolve_model("minilm-demo", registry)
    with pytest.raises(UserError, match=r"'minilm-demo' \(family encoder\).*not seq2seq"): load_model(mini, "seq2seq")
    with pytest.raises(UserError, match="needs num_labels"): load_model(mini, "sequence-classification")
    with pytest.raises(UserError, match="head must be one of"): load_model(mini, "token-classification")
    with pytest.raises(UserError, match="problem_type"):
        load_model(mini, "sequence-classification", num_labels=7, problem_type="multilabel")
    with pytest.raises(UserError, match="sequence-classification only"):
        load_model(mini, "question-answering", num_labels=2)
    t5 = resolve_model("t5-tiny-demo", registry)
    with pytest.raises(UserError, match="text to text"): load_model(t5, "sequence-classification", num_labels=3)
    with pytest.raises(UserError, match="not question-answering"): load_model(t5, "question-answering")


# ---------------------------------------------------------------- minilm-random-demo

def test_minilm_random_demo_resolves_offline_and_is_not_pretrained(registry, tmp_path):
    spec = registry["minilm-random-demo"]
    assert (spec.family, spec.domain, spec.builtin, spec.modes) == ("encoder", "general", "minilm-random-demo",
                                                                    ("finetune",))
    assert spec.train == registry["minilm-demo"].train  # the pair differs in pretraining only
    r = resolve_model("minilm-random-demo", registry)
    assert Path(r.source).parent == tmp_path / "cache" / "models" and r.offline
    assert load_tokenizer(r).get_vocab() == load_tokenizer(resolve_model("minilm-demo", registry)).get_vocab()
    model = load_model(r, "sequence-classification", num_labels=3)
    built = load_file(str(Path(r.source) / "model.safetensors"))
    shipped = load_file(str(minilm_demo_dir() / "model.safetensors"))
    assert sorted(built) == sorted(k for k in shipped if k != "embeddings.position_ids")  # same architecture
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, built[key])  # the built weights load
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert built[name].shape == shipped[name].shape
        assert not torch.allclose(built[name], shipped[name], atol=1e-2), name  # not the pretrained weights


def test_minilm_random_demo_is_deterministic_and_built_once(tmp_path):
    models = tmp_path / "a" / "models"
    a, b = build_minilm_random_demo(models), build_minilm_random_demo(tmp_path / "b")
    weights = _state_hash(load_file(str(a / "model.safetensors")))
    assert weights == _state_hash(load_file(str(b / "model.safetensors")))
    other_seed = build_minilm_random_demo(tmp_path / "c", seed=1)
    assert _state_hash(load_file(str(other_seed / "model.safetensors"))) != weights
    assert build_minilm_random_demo(models) == a
    assert [p.name for p in models.iterdir()] == [a.name]  # no temporary folder left behind
    assert json.loads((a / "clinical_repro_demo.json").read_text())["seed"] == 0
    # once built, resolving it imports neither torch nor transformers (grid planning stays fast)
    code = ("import sys; from clinical_repro.models import resolve_model; r = resolve_model('minilm-random-demo'); "
            "print(r.source, 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "CLINICAL_REPRO_CACHE": str(tmp_path / "a")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(a), "False", "False"]


# ---------------------------------------------------------------- t5-tiny-demo

def test_t5_tiny_demo_is_deterministic_and_recorded(tmp_path):
    a, b = build_t5_tiny_demo(tmp_path / "a"), build_t5_tiny_demo(tmp_path / "b")
    assert _state_hash(load_file(str(a / "model.safetensors"))) == _state_hash(load_file(str(b / "model.safetensors")))
    assert _state_hash(load_file(str(build_t5_tiny_demo(tmp_path / "c", seed=1) / "model.safetensors"))) != \
        _state_hash(load_file(str(a / "model.safetensors")))
    assert build_t5_tiny_demo(tmp_path / "a") == a
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]  # no temporary folder left behind
    rec = json.loads((a / "clinical_repro_demo.json").read_text())
    assert rec["seed"] == 0 and rec["config"] == {"d_model": 64, "d_ff": 128, "num_layers": 2,
                                                   "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16}
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["pad_token_id"], cfg["eos_token_id"],
            cfg["decoder_start_token_id"]) == (30522, 0, 102, 0)
    vocab = (minilm_demo_dir() / "vocab.txt").read_text().splitlines()
    assert (vocab[0], vocab[102]) == ("[PAD]", "[SEP]")


def test_t5_tiny_demo_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import transformers
    def boom(self, *a, **k): raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(transformers.T5ForConditionalGeneration, "save_pretrained", boom)
        with pytest.raises(KeyboardInterrupt): build_t5_tiny_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert (build_t5_tiny_demo(tmp_path) / "model.safetensors").is_file()


def test_t5_tiny_demo_round_trip_and_generate(registry, tmp_path):
    r = resolve_model("t5-tiny-demo", registry)
    assert Path(r.source).parent == tmp_path / "cache" / "models" and r.offline
    tok, model = load_tokenizer(r), load_model(r, "seq2seq").eval()
    assert _state_hash(model.state_dict()) == _state_hash(
        {**load_file(str(Path(r.source) / "model.safetensors")), "lm_head.weight": model.shared.weight,
         "encoder.embed_tokens.weight": model.shared.weight, "decoder.embed_tokens.weight": model.shared.weight})
    enc = tok(["premise: no fever. hypothesis: afebrile.", "question: effusion? context: none seen."],
              padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}  # T5 takes no token_type_ids
    labels = tok(text_target=["entailment", "no"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad(): logits = model(**enc, labels=labels).logits
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again = load_model(resolve_model("copy", {"copy": registry["t5-tiny-demo"].model_copy(
        update={"builtin": None, "local_path": str(tmp_path / "saved")})}), "seq2seq").eval()
    with torch.no_grad(): assert torch.equal(again(**enc, labels=labels).logits, logits)
    out = model.generate(**enc, max_new_tokens=5, num_beams=2)
    assert out.shape[0] == 2 and out.shape[1] <= 6 and (out[:, 0] == 0).all()  # starts from decoder_start = pad
    assert all(isinstance(t, str) for t in tok.batch_decode(out, skip_special_tokens=True))


# ---------------------------------------------------------------- precision

T4, V100, A100, A10, H100 = (7, 5), (7, 0), (8, 0), (8, 6), (9, 0)


@pytest.mark.parametrize("family,device,cap,expected", [
    ("encoder", "cuda", T4, "fp16"), ("seq2seq", "cuda", T4, "fp32"), ("decoder", "cuda", T4, "fp16"),
    ("encoder", "cuda", V100, "fp16"), ("seq2seq", "cuda", V100, "fp32"), ("decoder", "cuda", V100, "fp16"),
    ("encoder", "cuda", A100, "bf16"), ("seq2seq", "cuda", A100, "bf16"), ("decoder", "cuda", A100, "bf16"),
    ("encoder", "cuda", A10, "bf16"), ("seq2seq", "cuda", A10, "bf16"), ("decoder", "cuda", A10, "bf16"),
    ("encoder", "cuda", H100, "bf16"), ("seq2seq", "cuda", H100, "bf16"), ("decoder", "cuda", H100, "bf16"),
    ("encoder", "cpu", None, "fp32"), ("seq2seq", "cpu", None, "fp32"), ("decoder", "cpu", None, "fp32"),
    ("seq2seq", "mps", None, "fp32"),
])
def test_precision_policy(family, device, cap, expected):
    assert choose_precision(family, device, cap) == expected


def test_precision_bad_arguments():
    with pytest.raises(UserError, match="compute capability"): choose_precision("encoder", "cuda", None)
    with pytest.raises(UserError, match="family must be one of"): choose_precision("t5", "cpu", None)


def test_device_info_decides_from_capability_not_is_bf16_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 claims (emulated)
    info = device_info()
    assert info == {"type": "cuda", "name": "Tesla T4", "capability": [7, 5], "bf16": False,
                    "precision": {"encoder": "fp16", "seq2seq": "fp32", "decoder": "fp16"}}
    json.dumps(info)  # goes into the results file as is


def test_device_info_here():
    info = device_info()
    if info["type"] != "cuda": assert info["precision"] == {"encoder": "fp32", "seq2seq": "fp32", "decoder": "fp32"}
    assert info["bf16"] == (info["precision"]["seq2seq"] == "bf16")


# ---- local LLMs: matched pairs, licences and access (params/llm-icl.yaml) --------------------------------------------

def test_matched_pairs_are_the_medical_models_and_the_general_models_of_their_base(registry):
    names = load_grid(grid_path("llm-icl")).icl.models
    assert models.matched_pairs(names, registry) == [
        ("biomistral-7b", "mistral-7b-instruct-v0-1"), ("medgemma-4b-it", "gemma-3-4b-it"),
        ("medgemma-27b-text-it", "gemma-3-27b-it"), ("meditron-7b", "llama-2-7b")]
    for medical, general in models.matched_pairs(names, registry):
        assert registry[medical].domain != "general" and registry[general].domain == "general"
    assert registry["biomistral-7b"].hub_id == "BioMistral/BioMistral-7B"
    assert registry["medgemma-4b-it"].hub_id == "google/medgemma-4b-it"
    assert registry["meditron-7b"].hub_id == "epfl-llm/meditron-7b"
    assert models.matched_pairs(["biomistral-7b", "gemma-3-4b-it"], registry) == []   # its base not in the list


def test_every_llm_of_the_grid_records_its_licence_and_gated_ones_say_how_to_get_access(registry):
    for name in load_grid(grid_path("llm-icl")).icl.models:
        spec = registry[name]
        assert spec.licence and spec.hub_id and spec.family == "decoder", name
        if spec.hub_id.startswith(("google/", "meta-llama/")):
            assert spec.access, f"{name}: gated on the hub, but no `access` says how to get it"
    facts = models.model_facts("medgemma-4b-it", registry)
    assert facts["licence"] == "health-ai-developer-foundations" and "clinical diagnosis" in facts["use_restriction"]
    assert facts["hub_id"] == "google/medgemma-4b-it" and facts["base"] == "gemma-3-4b-it"
    lines = models.terms_lines(["minilm-demo", "biomistral-7b", "mistral-7b-instruct-v0-1"], registry)
    assert lines[0].startswith("models (licence") and not any("minilm-demo" in line for line in lines)
    assert lines[-1] == "  matched pairs (medical vs general, same base): biomistral-7b vs mistral-7b-instruct-v0-1"
    assert models.terms_lines(["minilm-demo"], registry) == []


def test_a_base_naming_no_entry_or_another_family_is_an_error_naming_the_key(tmp_path):
    p = _write_copy(tmp_path, lambda s: s.replace("  base: llama-2-7b\n", "  base: llama-2-7\n"))
    with pytest.raises(DataError) as e: load_registry(p)
    assert str(e.value.problems[0]).startswith(f"{p}: meditron-7b.base: the name of another registry entry, got "
                                                "'llama-2-7' (did you mean 'llama-2-7b'?)")
    assert len(e.value.problems) == 1
    p = _write_copy(tmp_path, lambda s: s.replace("  base: llama-2-7b\n", "  base: t5-base\n"))
    with pytest.raises(DataError, match="meditron-7b.base: a decoder model .* got 't5-base', a seq2seq"):
        load_registry(p)
    p = _write_copy(tmp_path, lambda s: s.replace("  base: llama-2-7b\n", "  base: meditron-7b\n"))
    with pytest.raises(DataError, match="meditron-7b.base: the name of another registry entry, got 'meditron-7b'"):
        load_registry(p)
