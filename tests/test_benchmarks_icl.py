"""benchmarks/icl_throughput.py on a tiny seeded random Llama: every mode is measured on the same prompts, the
batch-1 reference is the speed-up's unit, and a backend that cannot run is reported, not raised. No timing asserted."""
import importlib.util, os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conftest import chat_tokenizer, tiny_llama_model
from clinical_repro import models
from clinical_repro.data import load_task

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)

SCRIPT = Path(__file__).resolve().parents[1]/"benchmarks"/"icl_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("icl_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama():
    "A tiny seeded random Llama over MiniLM's WordPiece tokenizer with a chat template."
    tok = chat_tokenizer()
    return tok, tiny_llama_model(tok)


def test_every_mode_is_measured_on_the_same_prompts(bench, tiny_llama, tiny_release, capsys):
    tok, model = tiny_llama
    task_data = load_task(tiny_release[0], "mednli")
    queries = task_data.splits["test"][:2]
    texts, options, room = bench.unit_prompts(model, tok, task_data.splits["train"], queries, 3, 2)
    assert len(texts) == 2 and options == ["entailment", "neutral", "contradiction"] and room == 8
    # 3 shots as chat turns (the decoder layout): 3 exemplar queries + the query, 3 answers + the open reply
    assert all(text.count("Premise: ") == 4 and text.count("<|im_start|>assistant\n") == 4 for text in texts)

    def no_vllm():
        raise bench.NotRun("not on this machine")
    results = bench.measure(model, tok, texts, options, room, batch_size=2, warmup=1,
                            backends={"transformers": lambda: bench.transformers_backend(model, tok),
                                      "vllm": no_vllm})
    assert results["backends"]["vllm"] == {"not_run": "not on this machine"}
    run = results["backends"]["transformers"]
    assert set(run["modes"]) == {"rank", "generate", "generate_batch1"}
    rows = run["modes"].values()
    assert all(row["items"] == 2 and row["items_per_s"] > 0 for row in rows)
    n_tokens = sum(len(tok(text, add_special_tokens=False)["input_ids"]) for text in texts)
    assert {row["tokens_in"] for row in rows} == {n_tokens}   # the same prompts in every mode
    assert run["modes"]["generate_batch1"]["speedup"] == 1.0
    assert 0 < run["modes"]["generate"]["tokens_out"] <= 2 * room
    # batched greedy decoding gives the replies of one prompt at a time (fp32)
    assert run["modes"]["generate"]["tokens_out"] == run["modes"]["generate_batch1"]["tokens_out"]
    assert run["replies_equal_to_batch1"] == 1.0
    bench.report(results)
    printed = capsys.readouterr().out
    assert "vllm: not run (not on this machine)" in printed and "generate_batch1" in printed


def test_vllm_is_not_chosen_without_cuda(bench):
    cpu = {"type": "cpu"}
    assert bench.chosen_backends(None, cpu) == ["transformers"]
    assert bench.chosen_backends("both", cpu) == ["transformers", "vllm"]
    with pytest.raises(bench.NotRun, match="vllm package is not installed|no CUDA device"):
        bench.vllm_backend(None, cpu)


def test_a_second_backend_runs_cold_and_a_failing_one_is_reported(bench, tiny_llama, tiny_release, monkeypatch):
    "The vLLM branch with a stand-in engine (the transformers model plus a prefix cache that counts its resets)."
    from clinical_repro import icl
    tok, model = tiny_llama
    task_data = load_task(tiny_release[0], "mednli")
    texts, options, room = bench.unit_prompts(model, tok, task_data.splits["train"], task_data.splits["test"][:2], 1, 2)

    class Engine:
        resets = 0
        def reset_prefix_cache(self): Engine.resets += 1

    class StandIn(icl.TransformersBackend):
        scoring, llm = "forced", Engine()
    monkeypatch.setattr(bench, "vllm_unavailable", lambda device: None)
    monkeypatch.setattr(bench.icl, "load_icl_backend", lambda name, resolved, device, **engine:
                        (tok, StandIn(model, tok)))
    results = bench.measure(model, tok, texts, options, room, batch_size=2, warmup=0,
                            backends={"vllm": lambda: bench.vllm_backend(None, {"type": "cuda"})})
    run = results["backends"]["vllm"]
    assert run["implementation"] == "icl.VLLMBackend, scoring forced" and Engine.resets == 2   # before each timed pass
    assert set(run["modes"]) == {"rank", "generate", "generate_batch1"} and run["replies_equal_to_batch1"] == 1.0

    def broken(name, resolved, device, **engine):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(bench.icl, "load_icl_backend", broken)
    with pytest.raises(bench.NotRun, match="loading failed: RuntimeError: CUDA out of memory"):
        bench.vllm_backend(None, {"type": "cuda"})


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPT.parent.glob("*.py")))
def test_every_benchmark_script_still_imports_the_package_it_measures(script):
    "A benchmark is not run in CI; its imports are: a renamed function breaks `--help` here, not on a GPU day."
    import subprocess, sys
    done = subprocess.run([sys.executable, str(SCRIPT.parent/script), "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_a_random_shape_runs_without_any_weights_file(bench, tmp_path, capsys):
    "--random-shape: seeded random weights in a checkpoint's shape over a given tokenizer; nothing downloaded."
    tok_dir = tmp_path/"tokenizer"
    chat_tokenizer().save_pretrained(tok_dir)
    payload = bench.main(["--random-shape", "tiny", "--tokenizer", str(tok_dir), "--items", "2", "--warmup", "0",
                          "--backend", "transformers", "--out", str(tmp_path/"out.json")])
    config = bench.shape_config("tiny", chat_tokenizer())
    assert payload["random_shape"] == "tiny" and payload["model"] == "random weights, tiny shape"
    assert config.vocab_size == len(chat_tokenizer()) and config.hidden_size == 64
    assert payload["n_params"] == sum(p.numel() for p in bench.transformers.LlamaForCausalLM(config).parameters())
    assert set(payload["results"]["backends"]["transformers"]["modes"]) == {"rank", "generate", "generate_batch1"}
    assert (tmp_path/"out.json").is_file() and "random weights, tiny shape" in capsys.readouterr().out
    eight_b = bench.shape_config("llama-3.1-8b", chat_tokenizer())
    with torch.device("meta"):
        n = sum(p.numel() for p in bench.transformers.LlamaForCausalLM(eight_b).parameters())
    assert round(n / 1e9, 2) == 8.03   # Llama-3.1-8B's 8.03 B parameters (its 128,256-token vocabulary)
    with pytest.raises(SystemExit):
        bench.parse_args(["--random-shape", "tiny", "--model", "smollm2-demo"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokenizer", str(tok_dir)])
