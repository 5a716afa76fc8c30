"""Model facts the paper's protocol depends on (issue 13, items 3 and 5): Clinical-T5's release folders, conversion and
input preprocessing (placeholder tags, lower-casing) on both the fine-tuning and the ICL path; GatorTron's cased
tokenizer; refusing a masked-LM head the checkpoint lacks; BioClinRoBERTa's archive nesting; the torch floor; the
precision policy for ICL on CUDA. Every model here is tiny, random and built offline in a temporary folder."""
import dataclasses, json, re, tomllib
from pathlib import Path

import pytest
import torch

from clinical_repro import icl, inputs, models
from clinical_repro.core import UserError
from clinical_repro.data import NLIRecord, load_task
from clinical_repro.experiment import run_unit
from clinical_repro.models import (ResolvedModel, build_t5_tiny_demo, load_registry, load_tokenizer, preprocess_text,
                                   preprocess_task_data, preprocessing, resolve_model)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "aspirin", "Aspirin", "patient", "Patient", "the", "The"]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


# ---------------------------------------------------------------- the registry's facts
def test_clinical_t5_release_mapping_and_preprocessing(registry):
    # REFERENCE.md: the paper's Clinical-T5-Base is the release's Clinical-T5-Scratch (uncased), its -Ckpt the
    # release's Clinical-T5-Base, Clinical-T5-Large the release's Clinical-T5-Large (cased)
    expected = {"clinical-t5-base": ("Clinical-T5-Scratch", True), "clinical-t5-base-ckpt": ("Clinical-T5-Base", False),
                "clinical-t5-large": ("Clinical-T5-Large", False)}
    for name, (folder, lowercase) in expected.items():
        assert registry[name].release_folder == folder
        assert preprocessing(registry[name]) == {"lowercase": lowercase, "placeholders": "tags"}
    # every other model reads the text as released
    others = {name: preprocessing(spec) for name, spec in registry.items() if name not in expected}
    assert set(map(json.dumps, others.values())) == {json.dumps({"lowercase": False, "placeholders": "keep"})}


def test_bioclinroberta_default_path_has_the_archive_nesting(registry, monkeypatch, tmp_path):
    monkeypatch.delenv("BIOCLINROBERTA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    inner = tmp_path / "models" / "RoBERTa-large-PM-M3-Voc" / "RoBERTa-large-PM-M3-Voc-hf"
    inner.mkdir(parents=True)
    (inner / "config.json").write_text("{}")   # the archive extracted under ~/models/, as it unpacks
    assert resolve_model("bioclinroberta", registry).source == str(inner)


def test_torch_floor_is_2_6():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = [d for d in dependencies if re.match(r"torch\b", d)]
    assert torch_pin and re.search(r">=\s*2\.6\b", torch_pin[0]), torch_pin


# ---------------------------------------------------------------- GatorTron's cased tokenizer
def _bert_vocab_folder(folder:Path, model_type:str) -> Path:
    "A BERT-style folder with a vocab file and a config only (as GatorTron ships: no tokenizer_config)."
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": len(VOCAB)}))
    return folder


def test_gatortron_tokenizer_is_cased(registry, tmp_path):
    folder = _bert_vocab_folder(tmp_path / "gatortron", "megatron-bert")
    spec = registry["gatortron"]
    assert spec.tokenizer.do_lower_case is False
    cased = load_tokenizer(ResolvedModel("gatortron", spec, str(folder), True))
    assert cased.tokenize("The Patient Aspirin") == ["The", "Patient", "Aspirin"]
    # without the registry's setting, BertTokenizer's default lower-cases: the defect this guards against
    plain = dataclasses.replace(ResolvedModel("x", spec, str(folder), True),
                                spec=spec.model_copy(update={"tokenizer": models.TokenizerSettings()}))
    assert load_tokenizer(plain).tokenize("The Patient Aspirin") == ["the", "patient", "aspirin"]


def test_tokenizer_that_ignores_the_setting_is_refused(registry):
    class LowerCasing:
        do_lower_case = True
    resolved = ResolvedModel("gatortron", registry["gatortron"], "/nowhere", True)
    with pytest.raises(UserError, match="tokenizer.do_lower_case: False.*do_lower_case=True"):
        models._check_tokenizer_settings(resolved, LowerCasing())


# ---------------------------------------------------------------- a masked-LM head the checkpoint lacks
def _tiny_bert(folder:Path, with_head:bool) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel
    _bert_vocab_folder(folder, "bert")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    torch.manual_seed(0)
    (BertForMaskedLM if with_head else BertModel)(config).save_pretrained(folder)
    return folder


def test_missing_mlm_head_is_refused(registry, tmp_path):
    spec = registry["bioclinicalbert"]   # the registry says it has a head; this checkpoint has none
    headless = ResolvedModel("bioclinicalbert", spec, str(_tiny_bert(tmp_path / "headless", False)), True)
    with pytest.raises(UserError, match=r"has no masked-LM head \(missing or mismatched: cls\.predictions"):
        icl.load_mlm(headless)


def test_present_mlm_head_loads_with_its_weights(registry, tmp_path):
    from safetensors.torch import load_file
    folder = _tiny_bert(tmp_path / "with-head", True)
    model = icl.load_mlm(ResolvedModel("bioclinicalbert", registry["bioclinicalbert"], str(folder), True))
    saved = load_file(str(folder / "model.safetensors"))
    key = "cls.predictions.transform.dense.weight"
    assert torch.equal(model.state_dict()[key], saved[key])


# ---------------------------------------------------------------- ICL on CUDA follows the precision policy
class _Loaded:
    "Stands in for a loaded model: records the device it is moved to."
    def to(self, device):
        self.device = device
        return self


@pytest.mark.parametrize("capability,expected", [((7, 5), {"seq2seq": "fp32", "decoder": "fp16", "encoder": "fp16"}),
                                                 ((8, 0), {"seq2seq": "bf16", "decoder": "bf16", "encoder": "bf16"})])
def test_icl_weights_follow_the_precision_policy(registry, monkeypatch, capability, expected):
    asked = {}
    monkeypatch.setattr(models, "load_tokenizer", lambda resolved: None)
    monkeypatch.setattr(models, "load_model", lambda resolved, head, dtype: asked.setdefault(head, dtype) and _Loaded())
    monkeypatch.setattr(icl, "load_mlm", lambda resolved, dtype: asked.setdefault("mlm", dtype) and _Loaded())
    device = {"type": "cuda", "capability": list(capability)}   # as device_info() writes it
    for family, name in (("seq2seq", "t5-base"), ("decoder", "pubmedgpt"), ("encoder", "roberta-large")):
        _, model = icl.load_icl_model(ResolvedModel(name, registry[name], name, True), device)
        assert model.device == "cuda"
    assert asked == {"seq2seq": expected["seq2seq"], "causal-lm": expected["decoder"], "mlm": expected["encoder"]}
    assert icl.icl_precision("seq2seq", {"type": "cpu", "capability": None}) == "fp32"


# ---------------------------------------------------------------- Clinical-T5: preprocessing on every path
def test_placeholder_shapes_by_hand():
    tags = {"lowercase": False, "placeholders": "tags"}
    cases = {"[**First Name**]": "[Name]", "[**Last Name (NamePattern1) 123**]": "[Name]",
             "[**Hospital1 18**]": "[Company]", "[**Location (un) 2**]": "[LOC]", "[**Telephone/Fax (1) 3**]": "[#]",
             "[**Age over 90 **]": "[Age]", "[**Medical Record Number 4**]": "[Reg#]", "[**2157-1-10**]": "2157-1-10",
             "[**1-10**]": "1-10", "[**3/12**]": "3/12", "[**January 3**]": "January 3", "[**1234**]": "[Reg#]",
             "[**Year (4 digits) 2157**]": "[YR]", "[**Month (only) 5**]": "[MO]", "[**State 8**]": "[State]",
             "[**Unusual**]": "[MISC]", "[****]": ""}
    for placeholder, replacement in cases.items():
        assert preprocess_text(placeholder, tags) == replacement, placeholder
    assert preprocess_text("On [**2157-1-10**], Dr. [**Last Name**] saw her.", {**tags, "lowercase": True}) == \
        "on 2157-1-10 , dr. [name] saw her."
    # as CLIP's token lists hold them once joined by spaces: the release's tokenizer split the brackets and stars
    assert preprocess_text("Dr. [ * * Known lastname 988 * * ] on [ * * 2150 - 04 - 15 * * ]", tags) == \
        "Dr. [Name] on 2150 - 04 - 15"
    plain_stars = "Disp : * 30 Tablet ( s ) * Refills : * 2 *"   # MIMIC's own asterisks are no placeholder
    assert preprocess_text(plain_stars, tags) == plain_stars


def test_the_synthetic_clip_notes_carry_placeholders_and_clinical_t5_reads_none(tiny_release, registry):
    "The demo data has MIMIC-style placeholders (header dates, some names); a Clinical-T5 unit sees tags instead."
    clip = load_task(tiny_release[0], "clip")
    texts = [s.text for split in clip.notes.values() for note in split for s in note.sentences]
    with_placeholders = [t for t in texts if "[ * *" in t]
    assert len(with_placeholders) >= len(clip.notes["train"])   # at least every note's header
    seen = preprocess_task_data(clip, registry["clinical-t5-base"])
    seen_texts = [s.text for split in seen.notes.values() for note in split for s in note.sentences]
    assert len(seen_texts) == len(texts) and not [t for t in seen_texts if "[ * *" in t]
    headers = [t for t in seen_texts if t.startswith("admission date")]
    assert headers and all("[" not in t and "*" not in t for t in headers)   # dates kept, brackets gone, lower-cased


@pytest.fixture
def clinical_t5_base(monkeypatch, tmp_path):
    "clinical-t5-base pointed at a tiny random T5 (its registry entry: lower-case, tags)."
    monkeypatch.setenv("CLINICAL_T5_BASE", str(build_t5_tiny_demo(tmp_path / "cache")))
    return "clinical-t5-base"


@pytest.fixture
def mednli_with_placeholders(tiny_release):
    "Tiny synthetic MedNLI with a placeholder in every premise (the generator may not write them)."
    task_data = load_task(tiny_release[0], "mednli")
    splits = {split: [dataclasses.replace(r, premise=f"Seen by [**First Name**] at [**Hospital1 18**]. {r.premise}")
                      for r in records] for split, records in task_data.splits.items()}
    return dataclasses.replace(task_data, splits=splits)


def test_finetuning_reads_preprocessed_text(clinical_t5_base, mednli_with_placeholders, monkeypatch, tmp_path):
    seen = []
    original = inputs.t2t_sources_targets
    def spy(task, items, **kwargs):
        sources, targets, ids = original(task, items, **kwargs)
        seen.extend(sources)
        return sources, targets, ids
    monkeypatch.setattr(inputs, "t2t_sources_targets", spy)
    fast = {"max_steps": 1, "eval_steps": 1, "effective_batch": 4}
    record = run_unit("mednli", clinical_t5_base, None, tmp_path / "out", train_overrides=fast,
                      data=mednli_with_placeholders)
    assert record["status"] == "ok"
    assert seen and all("seen by [name] at [company] ." in source for source in seen)   # train, dev and test
    assert not any("[**" in source or re.search("[A-Z]", source) for source in seen)


def test_icl_reads_preprocessed_text(clinical_t5_base, mednli_with_placeholders, monkeypatch, tmp_path):
    seen = {}
    original = icl.icl_queries
    def spy(task, task_data, *args, **kwargs):
        seen["train"] = task_data.splits["train"]
        return original(task, task_data, *args, **kwargs)
    monkeypatch.setattr(icl, "icl_queries", spy)
    record = icl.run_icl_unit("mednli", clinical_t5_base, None, tmp_path / "out", shots=1, limit=2,
                              data=mednli_with_placeholders)
    assert record["status"] == "ok"
    assert all(r.premise.startswith("seen by [name] at [company] .") for r in seen["train"])


def test_other_models_read_the_release_as_is(registry, mednli_with_placeholders):
    assert preprocess_task_data(mednli_with_placeholders, registry["t5-base"]) is mednli_with_placeholders
    cased = preprocess_task_data(mednli_with_placeholders, registry["clinical-t5-large"])
    first = cased.splits["train"][0]
    assert isinstance(first, NLIRecord) and first.premise.startswith("Seen by [Name] at [Company] .")


def test_a_preprocessing_or_tokenizer_setting_is_part_of_the_units_identity(registry):
    "Turning placeholder tags or casing on changes the run_id: results computed without them are never reused."
    from clinical_repro.config import make_run_id
    from clinical_repro.identity import resolve_unit
    plain = registry["minilm-demo"]
    variants = {"plain": plain,
                "tags": plain.model_copy(update={"preprocessing": plain.preprocessing.model_copy(
                    update={"placeholders": "tags"})}),
                "cased": plain.model_copy(update={"tokenizer": plain.tokenizer.model_copy(
                    update={"do_lower_case": False})})}
    configs = {name: resolve_unit("mednli", "minilm-demo", registry={**registry, "minilm-demo": spec})
               for name, spec in variants.items()}
    assert configs["plain"]["inputs"] == {"preprocessing": {"lowercase": False, "placeholders": "keep"},
                                          "tokenizer": {}}
    assert configs["tags"]["inputs"]["preprocessing"]["placeholders"] == "tags"
    assert configs["cased"]["inputs"]["tokenizer"] == {"do_lower_case": False}
    assert len({make_run_id(config, "data") for config in configs.values()}) == 3
