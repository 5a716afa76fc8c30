"""The two inference backends of decoder ICL behind one `prompt_pass` contract (transformers, vLLM), the grid and CLI
setting that chooses one, and the errors where vLLM cannot run.

The real vLLM is NOT exercised here: CI has no GPU and never installs vllm (it pins its own torch). The vLLM backend's
logic (token-id prompts, greedy replies decoded by the unit's tokenizer, option scores read from vLLM's log-probability
outputs) runs against `fake_vllm`, a stand-in `vllm` module injected in `sys.modules` whose `LLM` runs the same tiny
transformers Llama one request at a time and returns objects shaped like vLLM's (`RequestOutput.outputs[0].token_ids`,
`.text`, `.logprobs`; `RequestOutput.prompt_logprobs`: a list per position of {token id: Logprob}, None at position 0),
with vLLM's documented semantics: raw log-probabilities (before `allowed_token_ids`), the prompt's or sampled token
always in its position's dict, stopping at `stop_token_ids` and the model's end-of-sequence ids, the stop token kept."""
import json, os, sys, types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import chat_tokenizer, tiny_llama_model
from clinical_repro import icl, models, prompts, units
from clinical_repro.core import DataError, UserError
from clinical_repro.grid import load_grid
from clinical_repro.identity import ICL_BACKENDS, icl_identity
from clinical_repro.models import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)

OPTIONS = ["yes", "no contradiction", "entailment"]   # MedNLI-like answers: one, two and three tokens here
CUDA = {"type": "cuda", "name": "stand-in GPU (test)", "capability": [8, 0], "bf16": True,
        "precision": {"encoder": "bf16", "seq2seq": "bf16", "decoder": "bf16"}}
CPU = {"type": "cpu", "name": "test cpu", "capability": None}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny seeded random Llama over MiniLM's WordPiece tokenizer with a chat template, saved as a local model whose
    end-of-sequence id is a token it emits greedily (the second reply token to the first test prompt): replies end."""
    tok = chat_tokenizer()
    model = tiny_llama_model(tok)
    probe = tok(_chat_prompts(tok)[0], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        greedy = model.generate(input_ids=probe["input_ids"], max_new_tokens=2, do_sample=False, num_beams=1,
                                pad_token_id=tok.pad_token_id)
    model.generation_config.eos_token_id = int(greedy[0, -1])
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    spec = ModelSpec(paper_name="tiny Llama (test)", local_path=str(folder), family="decoder", domain="general",
                     size_m=0.1, modes=["icl"], has_mlm_head=False)
    return tok, model, folder, {**models.load_registry(), "tiny-llama": spec}


# ------------------------------------------------------------------------------------------ a stand-in vllm module
class Logprob:
    "vllm.logprobs.Logprob: one token's log-probability."
    def __init__(self, logprob:float, rank:int|None=None, decoded_token:str|None=None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class SamplingParams:
    "vllm.SamplingParams, the fields the backend may use (any other name is a TypeError, as a typo would be)."
    def __init__(self, *, n:int=1, temperature:float=1.0, max_tokens:int|None=16, logprobs:int|None=None,
                 prompt_logprobs:int|None=None, stop_token_ids:list|None=None, allowed_token_ids:list|None=None,
                 seed:int|None=None, skip_special_tokens:bool=True, detokenize:bool=True):
        assert max_tokens is None or max_tokens >= 1, "vLLM: max_tokens must be at least 1"
        self.n, self.temperature, self.max_tokens, self.logprobs = n, temperature, max_tokens, logprobs
        self.prompt_logprobs, self.stop_token_ids = prompt_logprobs, list(stop_token_ids or [])
        self.allowed_token_ids, self.seed = allowed_token_ids, seed


def _position(logprobs:torch.Tensor, token:int, k:int) -> dict:
    "One position's {token id: Logprob}: the top `k` and `token` (the prompt's or the sampled one) always."
    top = torch.topk(logprobs, k) if k > 0 else None
    found = {int(t): Logprob(float(v), rank=r + 1) for r, (v, t) in enumerate(zip(*top))} if top is not None else {}
    found.setdefault(int(token), Logprob(float(logprobs[token])))
    return found


class FakeLLM:
    "vllm.LLM over the same transformers weights, one request at a time, full forward passes (no cache)."
    created: list = []

    def __init__(self, model:str, tokenizer:str|None=None, dtype:str="auto", enable_prefix_caching:bool|None=None,
                 tensor_parallel_size:int=1, seed:int=0, **engine):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, enable_prefix_caching=enable_prefix_caching,
                           tensor_parallel_size=tensor_parallel_size, seed=seed, **engine)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()   # fp32: comparable
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.requests = 0
        FakeLLM.created.append(self)

    @torch.no_grad()
    def _logprobs(self, ids:list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def _one(self, ids:list[int], params:SamplingParams):
        self.requests += 1
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            lp = self._logprobs(ids)
            prompt_logprobs = [None] + [_position(lp[k - 1], ids[k], params.prompt_logprobs)
                                        for k in range(1, len(ids))]
        generated, sample_logprobs = [], [] if params.logprobs is not None else None
        stop = set(params.stop_token_ids) | self.eos
        while len(generated) < params.max_tokens:
            raw = self._logprobs(ids + generated)[-1]   # vLLM's default logprobs_mode: raw, before any mask
            masked = raw.clone()
            if params.allowed_token_ids is not None:
                keep = torch.full_like(raw, float("-inf"))
                keep[params.allowed_token_ids] = 0
                masked = raw + keep
            token = int(masked.argmax())
            generated.append(token)
            if sample_logprobs is not None:
                sample_logprobs.append(_position(raw, token, params.logprobs))
            if token in stop:
                break
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        output = types.SimpleNamespace(index=0, text=text, token_ids=generated, logprobs=sample_logprobs,
                                       finish_reason="stop" if generated[-1] in stop else "length")
        return types.SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=[output],
                                     finished=True)

    def generate(self, prompts, sampling_params=None, *, use_tqdm:bool=True, **kwargs):
        assert all(isinstance(p, dict) and set(p) == {"prompt_token_ids"} for p in prompts), "token-id prompts"
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        return [self._one(list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params)]


@pytest.fixture
def fake_vllm(monkeypatch):
    "The stand-in `vllm` module in `sys.modules` (LLM, SamplingParams); returns it."
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, SamplingParams, "0.0-test-stand-in"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.created = []
    return module


def _chat_prompts(tok) -> list[str]:
    "Chat prompts as a unit builds them: an instruction, two exemplar turns, then queries of different lengths."
    parts = [prompts.PromptParts("Answer entailment, contradiction or neutral.",
                                 (("Premise: no fever. Hypothesis: afebrile.", "entailment"),
                                  ("Premise: chest pain. Hypothesis: no pain.", "contradiction")), query)
             for query in ("Premise: cough. Hypothesis: sick.", "Premise: the patient is afebrile today and walking "
                           "without help. Hypothesis: fever.", "Is the patient febrile?", "Pain?")]
    return [icl.chat_prompt(tok, p) for p in parts]


# ------------------------------------------------------------------------------------------------------ (a), (b)
def test_transformers_backend_is_causal_prompt_pass_bit_for_bit(tiny_llama):
    tok, model, _, _ = tiny_llama
    texts = _chat_prompts(tok)
    backend = icl.TransformersBackend(model, tok)
    for options, room, batch, sort in ((OPTIONS, 6, 2, True), ((), 5, 3, True), (["yes", "no"], 0, 4, False)):
        via = backend.prompt_pass(texts, options, room, batch, sort)
        direct = icl.causal_prompt_pass(model, tok, texts, options, room, batch, sort)
        np.testing.assert_array_equal(via[0], direct[0])
        np.testing.assert_array_equal(via[1], direct[1])
        assert via[2:] == direct[2:]


@pytest.mark.parametrize("scoring", icl.VLLM_SCORINGS)
def test_vllm_backend_reads_what_transformers_computes(tiny_llama, fake_vllm, scoring):
    "Against the stand-in vllm (the real one is unverified here): the same option sums, replies and token counts."
    tok, model, folder, _ = tiny_llama
    texts = _chat_prompts(tok)
    vllm_backend = icl.VLLMBackend(str(folder), tok, dtype="fp32", scoring=scoring)
    reference = icl.TransformersBackend(model, tok).prompt_pass(texts, OPTIONS, 6, 2)
    got = vllm_backend.prompt_pass(texts, OPTIONS, 6, 2)
    assert [len(tok(o, add_special_tokens=False)["input_ids"]) for o in OPTIONS] == [1, 2, 3]
    np.testing.assert_allclose(got[0], reference[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[1], reference[1])
    assert got[2] == reference[2] and got[3:] == reference[3:]    # replies, tokens in, tokens out (EOS included)
    assert got[4] < 6 * len(texts)                                # some reply stopped at the end of sequence
    generated, reference = vllm_backend.prompt_pass(texts, (), 4), icl.TransformersBackend(model, tok).prompt_pass(
        texts, (), 4)
    assert generated[0].shape == (len(texts), 0) and generated[2:] == reference[2:]   # generation alone
    engine = fake_vllm.LLM.created[0].kwargs
    assert (engine["model"], engine["dtype"], engine["enable_prefix_caching"]) == (str(folder), "float32", True)


def test_vllm_backend_behind_a_whole_unit_predicts_what_transformers_does(tiny_release, tiny_llama, fake_vllm,
                                                                         tmp_path, monkeypatch):
    "A MedNLI unit on vLLM (stand-in, a stand-in GPU): its predictions are the transformers unit's; its run id differs."
    data, _ = tiny_release
    _, _, folder, registry = tiny_llama
    settings = dict(shots=1, limit=4, dev_n=4, template="paper", registry=registry)
    on_transformers = icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path/"t", **settings)
    monkeypatch.setattr(icl.models, "device_info", lambda: dict(CUDA))
    on_vllm = icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path/"v", backend="vllm", **settings)
    assert (on_transformers["config"]["backend"], on_vllm["config"]["backend"]) == ("transformers", "vllm")
    assert on_transformers["run_id"] != on_vllm["run_id"]
    read = lambda record, root: json.loads((root/record["predictions"]).read_text())["test"]
    assert read(on_vllm, tmp_path/"v") == read(on_transformers, tmp_path/"t")
    assert on_vllm["metrics"] == on_transformers["metrics"]
    assert on_vllm["cost"]["tokens_in"] == on_transformers["cost"]["tokens_in"]
    assert on_vllm["cost"]["tokens_out"] == on_transformers["cost"]["tokens_out"]
    assert FakeLLM.created[0].kwargs["dtype"] == "bfloat16"   # the precision policy's, on a capability-8.0 GPU
    engines = on_transformers["provenance"]["engine"], on_vllm["provenance"]["engine"]
    assert engines[0]["name"] == "transformers" and engines[0]["version"] == __import__("transformers").__version__
    assert engines[1] == {"name": "vllm", "version": "0.0-test-stand-in", "tensor_parallel_size": 1}
    assert (on_transformers["provenance"]["precision"], on_vllm["provenance"]["precision"]) == ("fp32", "bf16")


# ------------------------------------------------------------------------------------------------------------ (c)
def test_vllm_on_a_cpu_is_refused_before_anything_is_written(tiny_release, tiny_llama, fake_vllm, tmp_path,
                                                             monkeypatch):
    data, _ = tiny_release
    monkeypatch.setattr(icl.models, "device_info", lambda: dict(CPU))
    with pytest.raises(UserError, match="the vllm backend needs a CUDA GPU; this machine runs on cpu"):
        icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path/"out", shots=1, limit=2, backend="vllm",
                         registry=tiny_llama[3])
    assert not (tmp_path/"out").exists() and not FakeLLM.created


def test_vllm_for_an_encoder_or_seq2seq_model_names_the_model_and_family(tiny_release, tmp_path):
    data, _ = tiny_release
    for model, family in (("minilm-demo", "encoder"), ("t5-tiny-demo", "seq2seq")):
        with pytest.raises(UserError, match=f"model '{model}' \\(family: {family}\\) is not a decoder"):
            icl.run_icl_unit("mednli", model, data, tmp_path/"out", shots=1, limit=2, backend="vllm")
    assert not (tmp_path/"out").exists()


def test_vllm_missing_says_how_to_install_it(tiny_release, tiny_llama, tmp_path, monkeypatch):
    data, _ = tiny_release
    monkeypatch.setitem(sys.modules, "vllm", None)   # `import vllm` raises ImportError, whatever is installed
    monkeypatch.setattr(icl.models, "device_info", lambda: dict(CUDA))
    with pytest.raises(UserError, match=r'pip install "clinical_repro\[vllm\]" in a separate GPU environment'):
        icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path/"out", shots=1, limit=2, backend="vllm",
                         registry=tiny_llama[3])
    assert not (tmp_path/"out").exists()
    resolved = models.resolve_model("tiny-llama", tiny_llama[3])
    with pytest.raises(UserError, match="needs the vllm package"):
        icl.load_icl_backend("vllm", resolved, dict(CUDA))


def test_unknown_backend_is_refused_with_the_nearest_name(tiny_release, tmp_path):
    with pytest.raises(UserError, match=r"unknown ICL backend 'vlm' \(did you mean 'vllm'\?\)"):
        icl.run_icl_unit("mednli", "t5-tiny-demo", tiny_release[0], tmp_path/"out", shots=1, backend="vlm")
    assert not (tmp_path/"out").exists()


# ------------------------------------------------------------------------------------------------------------ (d)
GRID = """grid: b
data: {{dir: {data}}}
tasks: [mednli]
icl: {{models: [{model}], shots: [1], limit: 2, dev_n: 2{extra}}}
"""


def _grid(tmp_path, data, model="smollm2-demo", extra="") -> Path:
    path = tmp_path/"grid.yaml"
    path.write_text(GRID.format(data=data, model=model, extra=extra))
    return path


def test_grid_backend_is_checked_with_the_file_key_and_nearest_name(tiny_release, tmp_path):
    data, _ = tiny_release
    path = _grid(tmp_path, data, extra=", backend: vlm")
    with pytest.raises(DataError) as error:
        load_grid(path)
    assert str(error.value) == (f"{path}: icl.backend: unknown ICL backend 'vlm' (did you mean 'vllm'?); expected one "
                                f"of: {', '.join(ICL_BACKENDS)}")
    with pytest.raises(DataError, match="icl.backend: the vllm backend runs decoder models only; model 't5-tiny-demo'"):
        load_grid(_grid(tmp_path, data, model="t5-tiny-demo", extra=", backend: vllm"))
    assert load_grid(_grid(tmp_path, data)).icl.backend == "transformers"


def test_the_backend_is_part_of_the_run_id(tiny_release, tmp_path):
    "Two units that differ only by backend: the same resolved settings otherwise, different run ids (as planned)."
    data, _ = tiny_release
    unit = units.default_units("icl", shots=[1], limit=2)[0]
    assert unit["backend"] == "transformers"
    planned = {backend: units.identify("mednli", "smollm2-demo", "icl", {**unit, "backend": backend}, data, tmp_path)
               for backend in ICL_BACKENDS}
    assert planned["transformers"] != planned["vllm"]
    configs = {backend: icl_identity("mednli", "smollm2-demo", data, shots=1, limit=2, backend=backend)
               for backend in ICL_BACKENDS}
    assert [configs[backend][2] for backend in ICL_BACKENDS] == [planned[backend] for backend in ICL_BACKENDS]
    drop = lambda config: {key: value for key, value in config.items() if key != "backend"}
    assert drop(configs["transformers"][0]) == drop(configs["vllm"][0])


def test_run_icl_backend_replaces_the_grids_in_the_plan(tiny_release, tmp_path, run_main):
    "`run GRID --dry-run --json --icl-backend vllm`: every unit and the model facts say vllm, with other run ids."
    data, _ = tiny_release
    path = _grid(tmp_path, data)
    plans = {}
    for flag in ([], ["--icl-backend", "vllm"]):
        code, out, err = run_main("run", path, "--dry-run", "--json", "--reports", tmp_path/"reports", *flag)
        plans[tuple(flag)] = json.loads(out)
    default, vllm = plans[()], plans[("--icl-backend", "vllm")]
    assert default["models"]["smollm2-demo"]["backend"] == "transformers"
    assert vllm["models"]["smollm2-demo"]["backend"] == "vllm"
    assert {u["backend"] for u in default["units"]} == {"transformers"}
    assert {u["backend"] for u in vllm["units"]} == {"vllm"}
    assert {u["run_id"] for u in default["units"]}.isdisjoint({u["run_id"] for u in vllm["units"]})
    code, out, err = run_main("run", _grid(tmp_path, data, model="t5-tiny-demo"), "--dry-run", "--icl-backend", "vllm",
                              "--reports", tmp_path/"reports")
    assert code != 0 and "icl.backend (given as --icl-backend" in err and "'t5-tiny-demo' (family: seq2seq)" in err
    assert not (tmp_path/"reports").exists()


# ------------------------------------------------------------------------------------------------------- packaging
def test_only_the_vllm_extra_names_vllm():
    "CI and CPU installs (dev, demo, ...) never pull vLLM: only the `vllm` extra names it."
    import tomllib
    project = tomllib.loads((Path(__file__).resolve().parents[1]/"pyproject.toml").read_text())["project"]
    naming = lambda requirements: any(r.split("[")[0].split(">")[0].split("=")[0].strip().lower() == "vllm"
                                      for r in requirements)
    extras = project["optional-dependencies"]
    assert naming(extras["vllm"]) and not naming(project["dependencies"])
    assert [name for name, requirements in extras.items() if naming(requirements)] == ["vllm"]


# --------------------------------------------------------------------------------------- (e) vLLM over several nodes
@pytest.fixture
def ray_cluster(monkeypatch):
    "A `ray` importable here (a stand-in: vLLM, not this project, talks to the cluster) and RAY_ADDRESS set."
    import importlib.machinery
    module = types.ModuleType("ray")
    module.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    monkeypatch.setitem(sys.modules, "ray", module)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    return module


def test_vllm_over_several_nodes_splits_layers_by_pipeline_over_ray(tiny_llama, fake_vllm, ray_cluster, monkeypatch):
    "icl.nodes > 1 (`$CLINICAL_REPRO_VLLM_NODES`): tensor parallel within a node, pipeline parallel across, on Ray."
    resolved = models.resolve_model("tiny-llama", tiny_llama[3])
    monkeypatch.setenv(icl.executors.VLLM_NODES_ENV, "2")
    _, backend = icl.load_icl_backend("vllm", resolved, dict(CUDA), tensor_parallel_size=4)
    engine = FakeLLM.created[-1].kwargs
    assert (engine["tensor_parallel_size"], engine["pipeline_parallel_size"], engine["distributed_executor_backend"]) \
        == (4, 2, "ray")
    assert backend.engine == {"name": "vllm", "version": "0.0-test-stand-in", "tensor_parallel_size": 4,
                              "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}
    icl.load_icl_backend("vllm", resolved, dict(CUDA), nodes=1)   # one node: no pipeline, no Ray
    assert "pipeline_parallel_size" not in FakeLLM.created[-1].kwargs


def test_vllm_over_several_nodes_needs_ray_and_a_cluster_before_anything_is_written(tiny_release, tiny_llama,
                                                                                   fake_vllm, ray_cluster, tmp_path,
                                                                                   monkeypatch):
    data, _ = tiny_release
    monkeypatch.setattr(icl.models, "device_info", lambda: dict(CUDA))
    monkeypatch.setenv(icl.executors.VLLM_NODES_ENV, "2")
    monkeypatch.delenv("RAY_ADDRESS")
    run = lambda: icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path/"out", shots=1, limit=2, backend="vllm",
                                   registry=tiny_llama[3])
    with pytest.raises(UserError, match="icl.nodes: 2 splits the model over 2 nodes of a Ray cluster, but no cluster "
                                        "is named here \\(RAY_ADDRESS is unset\\): run the grid with --executor ray"):
        run()
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"Ray is not installed here: pip install 'clinical_repro\[ray\]'"):
        run()
    monkeypatch.setenv(icl.executors.VLLM_NODES_ENV, "two")
    with pytest.raises(UserError, match="CLINICAL_REPRO_VLLM_NODES='two': expected a whole number of nodes"):
        run()
    assert not (tmp_path/"out").exists() and not FakeLLM.created


def test_grid_nodes_need_the_vllm_backend_and_reach_the_notebooks_environment(tiny_release, tmp_path, monkeypatch):
    from clinical_repro.grid import ICL_BACKEND_ENV, icl_engine_env
    data, _ = tiny_release
    path = _grid(tmp_path, data, extra=", nodes: 2")
    with pytest.raises(DataError) as error:
        load_grid(path)
    assert str(error.value) == (f"{path}: icl.nodes: 2 nodes split one vLLM engine over a Ray cluster, but icl.backend "
                                "is 'transformers': set backend: vllm (decoders on CUDA GPUs, run with --executor ray "
                                "on the cluster), or nodes: 1")
    grid = load_grid(_grid(tmp_path, data, extra=", backend: vllm, nodes: 2"))
    assert icl_engine_env(grid) == {"CLINICAL_REPRO_VLLM_NODES": "2"}
    assert icl_engine_env(load_grid(_grid(tmp_path, data, extra=", backend: vllm"))) == {}
    monkeypatch.setenv(ICL_BACKEND_ENV, "transformers")   # `run --icl-backend transformers` over such a grid
    with pytest.raises(DataError, match=r"but icl.backend \(given as --icl-backend"):
        load_grid(_grid(tmp_path, data, extra=", backend: vllm, nodes: 2"))


class _Remote:
    "What `ray.remote(f).options(...)` returns in `StandInRay`: submits record their function, options and env."
    def __init__(self, ray, function, options):
        self.ray, self.function, self.options = ray, function, options

    def remote(self, template, out_nb, params, env, log_file):
        ref = f"ref{len(self.ray.submitted)}"
        self.ray.submitted.append((ref, self.function.__name__, self.options, params, env))
        self.ray.events.append(("start", params["i"]))
        return ref


class StandInRay:
    "Enough of `ray` for `run_on_ray`: a cluster of GPU nodes whose tasks finish in the order they started."
    def __init__(self):
        self.submitted, self.events = [], []

    def is_initialized(self): return True
    def nodes(self): return [{"Resources": {"CPU": 8.0, "GPU": 2.0, "node:10.0.0.7": 1.0}}]
    def cluster_resources(self): return {"CPU": 8.0, "GPU": 2.0}
    def cancel(self, ref, force=False): pass

    def remote(self, function):
        return types.SimpleNamespace(options=lambda **options: _Remote(self, function, options))

    def wait(self, refs, num_returns=1):
        order = [ref for ref, *_ in self.submitted]
        return [min(refs, key=order.index)], []

    def get(self, ref):
        params = next(params for r, _, _, params, _ in self.submitted if r == ref)
        self.events.append(("done", params["i"]))
        return {"error": None, "node": "n", "seconds": 0.0}


def test_the_ray_executor_gives_a_notebook_spanning_nodes_no_gpu_and_runs_them_one_at_a_time(monkeypatch, tmp_path):
    "Its vLLM's workers take the GPUs (a placement group): the notebook's task holds none, on a GPU node, alone."
    from clinical_repro import executors
    ray = StandInRay()
    monkeypatch.setattr(executors, "_import_ray", lambda: ray)
    spanning = {executors.VLLM_NODES_ENV: "2"}
    calls = [{"template": "t.ipynb", "out_nb": str(tmp_path/f"{i}.ipynb"), "params": {"i": i, "mode": mode},
              "env": env} for i, (mode, env) in enumerate([("icl", spanning), ("icl", spanning), ("finetune", {})])]
    executors.run_on_ray(calls, lambda index, error: None)
    tasks = {params["i"]: (function, options, env) for _, function, options, params, env in ray.submitted}
    assert tasks[2][:2] == ("_run_call", {"num_gpus": 1, "num_cpus": 4, "max_retries": 0,
                                          "name": "clinical-repro-notebook"})
    assert tasks[0][0] == "_run_spanning_call" and tasks[0][1]["num_gpus"] == 0
    assert tasks[0][1]["resources"] == {"node:10.0.0.7": 0.001}
    assert tasks[0][2] == {**spanning, "RAY_ADDRESS": "auto"} and tasks[2][2] == {}
    assert ray.events[:3] == [("start", 0), ("start", 2), ("done", 0)]   # the second spanning one waits for the first
    assert ray.events.index(("start", 1)) > ray.events.index(("done", 0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # what Ray sets for a task without GPUs
    seen = []
    monkeypatch.setattr(executors, "_run_call", lambda *args: seen.append(os.environ.get("CUDA_VISIBLE_DEVICES")))
    executors._run_spanning_call("t", "o", {}, {})
    assert seen == [None] and os.environ["CUDA_VISIBLE_DEVICES"] == ""   # the kernel sees its node's GPUs


def test_a_local_run_of_a_grid_spanning_nodes_is_refused_before_any_notebook(tiny_release, tmp_path, monkeypatch):
    from clinical_repro import executors
    from clinical_repro.runner import run_grid
    data, _ = tiny_release
    path = _grid(tmp_path, data, extra=", backend: vllm, nodes: 2")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(executors, "ray_available", lambda: True)
    with pytest.raises(UserError, match="icl.nodes: 2 splits the model over 2 nodes of a Ray cluster, but no cluster"):
        run_grid(path, data, tmp_path/"reports", executor="local", progress=False)
    assert not (tmp_path/"reports").exists()   # nothing planned, nothing written
