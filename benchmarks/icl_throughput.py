#!/usr/bin/env python
"""In-context learning throughput: items/s for 3-shot MedNLI prompts, rank classification against free generation,
the transformers backend against vLLM, on the same model and the same prompts, in one process.

    python benchmarks/icl_throughput.py --quick                  # CPU smoke run: smollm2-demo, 8 items, ~25 s
    python benchmarks/icl_throughput.py --items 64 --out icl.json
    python benchmarks/icl_throughput.py --model qwen2-5-7b-instruct --items 300 --backend both   # a GPU
    python benchmarks/icl_throughput.py --random-shape llama-3.1-8b --tokenizer DIR   # a GPU without the weights

Modes, each timed after an untimed warm-up pass:
  rank             the three MedNLI options scored after every prompt, batched (one pass per prompt)
  generate         greedy generation, batched, `answer_room` tokens at most (the task's max_new_tokens)
  generate_batch1  the earlier reproductions' way and the reference of every speed-up: transformers
                   `model.generate` (greedy) on one prompt at a time, always on the transformers model

A benchmark, not a test: it asserts nothing. What is measured and how: benchmarks/README.md.
"""
from __future__ import annotations
import os
# Offline by design: nothing here downloads; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse, gc, importlib.metadata, importlib.util, platform, sys, tempfile, time
from datetime import datetime, timezone
from pathlib import Path

# Benchmark the checkout this file lives in, installed or not (the GPU machine runs it from a bare copy of the tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers

from clinical_repro import icl, models, prompts
from clinical_repro.core import UserError, atomic_write_json
from clinical_repro.data import load_task
from clinical_repro.synthetic import write_demo_data
from clinical_repro.tasks import MEDNLI_LABELS, answer_room, icl_budget

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

TASK = "mednli"
BACKENDS = icl.ICL_BACKENDS   # the engines an in-context unit can run on
MODES = ("rank", "generate", "generate_batch1")
BASELINE = "generate_batch1"
QUICK = dict(items=8, warmup=2, threads=1, model="smollm2-demo")   # one thread: steady on shared cores
DEFAULTS = {"cpu": dict(items=32, warmup=4), "cuda": dict(items=300, warmup=16)}

# Seeded random weights in a checkpoint's shape run at its speed, and need no download: what a machine without the
# weights can time (the answers mean nothing). vocab_size None: the tokenizer's.
SHAPES = {"llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                               max_position_embeddings=8192),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=None, max_position_embeddings=4096)}

class NotRun(Exception):
    "A backend that cannot run here (the reason is printed, never raised to the caller)."

# --------------------------------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    "The CPU's model name as /proc/cpuinfo gives it."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

def version(package:str) -> str|None:
    "An installed distribution's version, without importing it; None when absent."
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None

def machine(device:dict, dtype:str) -> dict:
    "What the numbers were measured on."
    cuda = device["type"] == "cuda"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device["type"],
            "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(), "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "vllm": version("vllm"),
            "dtype": dtype}

def vllm_unavailable(device:dict) -> str|None:
    "Why vLLM cannot run here; None when it may. Looks for the package without importing it."
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    if device["type"] != "cuda":
        return f"no CUDA device ({device['type']} here)"
    return None

# --------------------------------------------------------------------------------------------------------- prompts
def mednli_queries(data_dir:Path|None, work:Path, n:int) -> tuple[list, list]:
    """(train records, `n` query records): `--data`'s MedNLI, else the synthetic demo release written under `work`
    (seed 0; further seeds while more distinct items are needed). Queries: test, then dev records."""
    if data_dir is not None:
        task_data = load_task(data_dir, TASK)
        pool = task_data.splits["test"] + task_data.splits["dev"]
        if n > len(pool):
            raise UserError(f"--items {n}: {data_dir} has {len(pool)} MedNLI test and dev items; expected at most that")
        return task_data.splits["train"], pool[:n]
    train, pool, seed = None, [], 0
    while len(pool) < n:
        write_demo_data(work/f"demo-seed{seed}", seed=seed, size="demo")
        task_data = load_task(work/f"demo-seed{seed}", TASK)
        train = train or task_data.splits["train"]
        pool += task_data.splits["test"] + task_data.splits["dev"]
        seed += 1
    return train, pool[:n]

def unit_prompts(model, tokenizer, train:list, queries:list, shots:int, batch_size:int) -> tuple[list, list, int]:
    """(chat prompts, the three options, answer room) as an ICL unit builds them: exemplars by
    `prompts.draw_exemplars` (draw 0, seed 0), the fixed `paper` template, the decoder budget and layout."""
    prompt_set = prompts.load_prompts(TASK)
    exemplars = prompts.draw_exemplars(train, shots, 0, 0, prompts.exemplar_stratum(TASK))
    no_notes = icl.NoteWindows([], 0)
    predictor = icl.TemplatePredictor(TASK, model, tokenizer, prompt_set, exemplars, no_notes, "sum", batch_size,
                                      budget=icl_budget("decoder"), layout=prompts.prompt_layout("decoder"))
    room = answer_room()[TASK]
    texts = predictor._texts(prompt_set.paper_template(), queries, no_notes, room)
    return texts, [prompt_set.verbalizers[label] for label in MEDNLI_LABELS], room

# --------------------------------------------------------------------------------------------------------- models
def shape_config(shape:str, tokenizer):
    "A Llama config of `shape` (`SHAPES`) over `tokenizer` (its special tokens; a vocabulary at least as large)."
    settings = dict(SHAPES[shape])
    settings["vocab_size"] = max(settings["vocab_size"] or 0, len(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return transformers.LlamaConfig(**settings, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, tie_word_embeddings=False)

def random_shape_model(shape:str, tokenizer_dir:str|Path, device:dict, folder:Path, seed:int=0):
    """(tokenizer, model, folder): a Llama of `shape` with seeded random weights, built on the device in the precision
    policy's dtype (`icl.icl_precision`), and a folder with its config, generation config and tokenizer (vLLM reads
    it with `load_format="dummy"`: random weights, no files)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = shape_config(shape, tokenizer)
    dtype = models.torch_dtype(icl.icl_precision("decoder", device))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if device["type"] == "cuda" else "cpu"):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    config.save_pretrained(folder)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, model, folder

def registry_model(name:str, device:dict):
    "(resolved, tokenizer, model) of a registry decoder, loaded as an ICL unit loads it (`icl.load_icl_model`)."
    resolved = models.resolve_model(name)
    if resolved.spec.family != "decoder":
        raise UserError(f"--model {name} is of the {resolved.spec.family} family; expected a decoder "
                        "(chat-template ICL)")
    return (resolved, *icl.load_icl_model(resolved, device))

# --------------------------------------------------------------------------------------------------------- backends
def transformers_backend(model, tokenizer):
    "`icl.TransformersBackend` on the already loaded model (the batch-1 reference needs the model itself)."
    return icl.TransformersBackend(model, tokenizer), "icl.TransformersBackend"

def vllm_backend(resolved, device:dict, scoring:str|None=None, shape:tuple|None=None):
    """`icl.load_icl_backend('vllm', ...)` (`scoring`: `icl.VLLM_SCORINGS`, None: its default), or with `shape` =
    (folder, tokenizer) of `random_shape_model` an `icl.VLLMBackend` on dummy weights; NotRun where it cannot."""
    reason = vllm_unavailable(device)
    if reason is not None:
        raise NotRun(reason)
    engine = {} if scoring is None else {"scoring": scoring}
    try:
        if shape is None:
            _, backend = icl.load_icl_backend("vllm", resolved, device, **engine)
        else:
            backend = icl.VLLMBackend(str(shape[0]), shape[1], dtype=icl.icl_precision("decoder", device),
                                      load_format="dummy", **engine)
    except Exception as e:
        raise NotRun(f"loading failed: {type(e).__name__}: {e}") from None
    return backend, f"icl.VLLMBackend, scoring {backend.scoring}"

def cold(backend) -> None:
    "Empty vLLM's prefix cache, so that a timed pass does not reuse the prompts an earlier pass left there."
    reset = getattr(getattr(backend, "llm", None), "reset_prefix_cache", None)
    if reset is not None:
        reset()

# --------------------------------------------------------------------------------------------------------- measuring
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()

class Clock:
    "Wall and process CPU seconds of a timed block."
    def __enter__(self):
        _sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self
    def __exit__(self, *exc):
        _sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

def rates(n:int, tokens_in:int, tokens_out:int, clock:Clock, cpu:bool) -> dict:
    "items/s, tokens per item and the window of one timed mode."
    row = {"items": n, "seconds": clock.wall, "items_per_s": n / clock.wall, "tokens_in": tokens_in,
           "tokens_out": tokens_out, "tokens_in_per_item": tokens_in / n, "tokens_out_per_item": tokens_out / n}
    if cpu:
        row["cpu_share"] = clock.cpu / (clock.wall * torch.get_num_threads())
    return row

def batch1_generate(model, tokenizer, texts:list, room:int, progress:bool=False) -> tuple[list, int, int]:
    """Greedy replies one prompt at a time with transformers' `model.generate`, as earlier reproductions ran decoder
    ICL: (replies, prompt tokens, generated tokens up to and including the end of sequence)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    replies, tokens_in, tokens_out = [], 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in _bar(texts, "generate, batch 1", progress):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                                 do_sample=False, num_beams=1, pad_token_id=pad)
            reply = out[0, ids.shape[1]:].tolist()
            ends = [k for k, token in enumerate(reply) if token in eos]
            reply = reply[:ends[0] + 1] if ends else reply
            replies.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
            tokens_in, tokens_out = tokens_in + ids.shape[1], tokens_out + len(reply)
    return replies, tokens_in, tokens_out

def _bar(items, what:str, progress:bool):
    return tqdm(items, desc=what, leave=False, file=sys.stderr) if progress and tqdm is not None else items

def run_modes(backend, texts:list, options:list, room:int, batch_size:int, warmup:int, cpu:bool) -> tuple[dict, dict]:
    "Rank and batched generation on one backend, each after an untimed warm-up pass: (rows by mode, outputs)."
    if warmup:
        backend.prompt_pass(texts[:warmup], options, room, batch_size)
    cold(backend)
    with Clock() as clock:
        sums, _, _, tokens_in, _ = backend.prompt_pass(texts, options, 0, batch_size)
    rows = {"rank": rates(len(texts), tokens_in, 0, clock, cpu)}
    cold(backend)
    with Clock() as clock:
        _, _, replies, tokens_in, tokens_out = backend.prompt_pass(texts, (), room, batch_size)
    rows["generate"] = rates(len(texts), tokens_in, tokens_out, clock, cpu)
    return rows, {"rank": [MEDNLI_LABELS[i] for i in np.asarray(sums).argmax(-1)], "replies": replies}

def run_baseline(model, tokenizer, texts:list, room:int, warmup:int, cpu:bool, progress:bool) -> tuple[dict, list]:
    "The batch-1 `model.generate` reference, after an untimed warm-up on the first prompts."
    if warmup:
        batch1_generate(model, tokenizer, texts[:warmup], room)
    with Clock() as clock:
        replies, tokens_in, tokens_out = batch1_generate(model, tokenizer, texts, room, progress)
    return rates(len(texts), tokens_in, tokens_out, clock, cpu), replies

def agreement(a:list, b:list) -> float:
    "Share of items whose two outputs are the same."
    return sum(x == y for x, y in zip(a, b)) / len(a)

def measure(model, tokenizer, texts:list, options:list, room:int, *, backends:dict, batch_size:int=16,
            warmup:int=2, progress:bool=False) -> dict:
    """Every mode on the same prompts. `backends`: {name: a zero-argument function returning (backend, what it is),
    or raising NotRun}; the transformers model itself runs the batch-1 reference first. The JSON's `results`."""
    cpu = next(model.parameters()).device.type == "cpu"
    base, base_replies = run_baseline(model, tokenizer, texts, room, warmup, cpu, progress)
    base["speedup"] = 1.0
    out = {"reference": {"mode": BASELINE, "backend": "transformers", "row": base,
                         "how": "transformers model.generate, greedy, one prompt at a time"}, "backends": {}}
    for name, load in backends.items():
        try:
            backend, what = load()
        except NotRun as e:
            out["backends"][name] = {"not_run": str(e)}
            continue
        rows, outputs = run_modes(backend, texts, options, room, batch_size, warmup, cpu)
        if name != "transformers":
            del backend
            gc.collect()
        for row in rows.values():
            row["speedup"] = row["items_per_s"] / base["items_per_s"]
        rows[BASELINE] = base
        out["backends"][name] = {"implementation": what, "modes": rows,
                                 "replies_equal_to_batch1": agreement(outputs["replies"], base_replies),
                                 "example_reply": outputs["replies"][0] if outputs["replies"] else None}
    return out

# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"registry name (params/models.yaml) of a decoder; default {QUICK['model']}")
    p.add_argument("--random-shape", choices=list(SHAPES), help="instead of --model: seeded random weights in this "
                   "shape (its speed without its weights; the answers mean nothing), over --tokenizer")
    p.add_argument("--tokenizer", type=Path, help="with --random-shape: a folder with a chat tokenizer (default: "
                   "smollm2-demo's)")
    p.add_argument("--backend", choices=(*BACKENDS, "both"),
                   help="who runs rank and batched generation; default transformers, plus vllm when the vllm "
                   "package is installed and CUDA is present. The batch-1 reference always runs on transformers")
    p.add_argument("--items", type=int, help="MedNLI items (prompts) timed per mode; default 32 on CPU, 300 on CUDA")
    p.add_argument("--shots", type=int, default=3, help="exemplars per prompt (default 3)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch of rank and batched generation")
    p.add_argument("--warmup", type=int, help="prompts of the untimed warm-up pass of each mode (default 4 on CPU, "
                   "16 on CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice, 1 with --quick)")
    p.add_argument("--vllm-scoring", choices=icl.VLLM_SCORINGS,
                   help="how vLLM scores the options (icl.VLLMBackend's `scoring`; default: its own)")
    p.add_argument("--data", type=Path, help="a folder with the MedNLI release (default: synthetic demo data "
                   "written to a temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: --model {QUICK['model']} --items {QUICK['items']} --warmup {QUICK['warmup']} "
                   f"--threads {QUICK['threads']} unless given")
    p.add_argument("--out", metavar="PATH", help="also write every number to this JSON file")
    a = p.parse_args(argv)
    d = QUICK if a.quick else DEFAULTS["cuda" if torch.cuda.is_available() else "cpu"]
    a.items = a.items if a.items is not None else d["items"]
    a.warmup = a.warmup if a.warmup is not None else d["warmup"]
    a.threads = a.threads if a.threads is not None else d.get("threads")
    if a.random_shape and a.model:
        p.error("--random-shape replaces --model: give one of them")
    if a.tokenizer and not a.random_shape:
        p.error("--tokenizer goes with --random-shape (a registry model brings its own)")
    a.model = a.model or (None if a.random_shape else QUICK["model"])
    if a.items < 1 or a.warmup < 0 or a.batch_size < 1 or a.shots < 0:
        p.error("--items and --batch-size must be at least 1, --warmup and --shots at least 0")
    return a

def chosen_backends(flag:str|None, device:dict) -> list[str]:
    "The backends `--backend` asks for; by default vllm joins where it can run."
    if flag == "both":
        return list(BACKENDS)
    if flag is not None:
        return [flag]
    return list(BACKENDS) if vllm_unavailable(device) is None else ["transformers"]

def _row(who:str, mode:str, r:dict) -> str:
    share = f"{r['cpu_share']:>11.2f}" if "cpu_share" in r else ""
    return (f"{who:<14}{mode:<17}{r['items_per_s']:>10.2f}{r['speedup']:>9.2f}x{r['seconds']:>9.2f}{r['items']:>7}"
            f"{r['tokens_in_per_item']:>13.1f}{r['tokens_out_per_item']:>14.2f}{share}")

def report(results:dict) -> None:
    "The table: the batch-1 reference, then rank and batched generation per backend; the backends not run."
    base = results["reference"]
    cpu = "cpu_share" in base["row"]
    print(f"{'backend':<14}{'mode':<17}{'items/s':>10}{'speed-up':>10}{'seconds':>9}{'items':>7}"
          f"{'tok in/item':>13}{'tok out/item':>14}" + (f"{'cpu share':>11}" if cpu else ""))
    print(_row(base["backend"], BASELINE, base["row"]))
    for name, run in results["backends"].items():
        for mode in MODES[:2] if "not_run" not in run else ():
            print(_row(name, mode, run["modes"][mode]))
    for name, run in results["backends"].items():
        if "not_run" in run:
            print(f"{name}: not run ({run['not_run']})")
        else:
            print(f"{name}: batched greedy replies equal to the batch-1 replies on "
                  f"{100 * run['replies_equal_to_batch1']:.0f}% of items ({run['implementation']})")
    print(f"reference ({BASELINE}): {base['how']}; speed-up = items/s / the reference's items/s")
    if cpu and min(r["cpu_share"] for r in _rows(results)) < 0.85:
        print("note: cpu share < 0.85: other processes used these cores during a timed window")

def _rows(results:dict) -> list:
    "Every timed row."
    runs = [run for run in results["backends"].values() if "not_run" not in run]
    return [results["reference"]["row"]] + [run["modes"][mode] for run in runs for mode in MODES[:2]]

def main(argv=None) -> dict:
    a = parse_args(argv)
    transformers.logging.set_verbosity_error()  # the weight-loading report would drown the numbers
    transformers.logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.perf_counter()
    device = models.device_info()
    with tempfile.TemporaryDirectory(prefix="icl_throughput.") as tmp:
        return _run(a, device, Path(tmp), started)

def _run(a, device:dict, tmp:Path, started:float) -> dict:
    "`main` in a temporary folder (the demo data; a random shape's config and tokenizer for vLLM)."
    resolved, shape = None, None
    if a.random_shape:
        tokenizer_dir = a.tokenizer or models.load_tokenizer(models.resolve_model(QUICK["model"])).name_or_path
        tokenizer, model, folder = random_shape_model(a.random_shape, tokenizer_dir, device, tmp/"shape")
        shape = (folder, tokenizer)
    else:
        resolved, tokenizer, model = registry_model(a.model, device)
    info = {**machine(device, icl.icl_precision("decoder", device)),
            "model": a.model or f"random weights, {a.random_shape} shape", "random_shape": a.random_shape,
            "n_params": sum(p.numel() for p in model.parameters()), "items": a.items, "shots": a.shots,
            "batch_size": a.batch_size, "warmup": a.warmup, "quick": a.quick}
    train, queries = mednli_queries(a.data, tmp, a.items)
    texts, options, room = unit_prompts(model, tokenizer, train, queries, a.shots, a.batch_size)
    info.update(task=TASK, template="paper", layout=prompts.prompt_layout("decoder"), options=options, answer_room=room)
    print(f"icl_throughput: {info['model']} ({info['n_params']/1e6:.1f}M parameters, {info['dtype']}) on {device['type']} "
          f"[{info['device_name']}], torch {torch.__version__} ({torch.get_num_threads()} threads, nproc "
          f"{os.cpu_count()}), transformers {transformers.__version__}, vllm {info['vllm'] or 'absent'}")
    print(f"prompts: {len(texts)} MedNLI items, {a.shots}-shot, template 'paper', layout {info['layout']}; "
          f"options {options}; generation up to {room} tokens (answer_room); batch {a.batch_size}; "
          f"warm-up {a.warmup} prompts per mode")
    loaders = {"transformers": lambda: transformers_backend(model, tokenizer),
               "vllm": lambda: vllm_backend(resolved, device, a.vllm_scoring, shape)}
    names = chosen_backends(a.backend, device)
    if "vllm" in names and device["type"] == "cuda":   # vLLM's memory is its own: run it after the model is gone
        loaders["vllm"] = _after_freeing(model, loaders["vllm"])
    results = measure(model, tokenizer, texts, options, room, backends={n: loaders[n] for n in names},
                      batch_size=a.batch_size, warmup=a.warmup, progress=True)
    report(results)
    payload = {**info, "results": results, "wall_seconds": time.perf_counter() - started}
    if a.out:
        atomic_write_json(Path(a.out), payload)
    return payload

def _after_freeing(model, load):
    "`load`, called once the transformers model's weights have left the GPU."
    def run():
        model.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        return load()
    return run

if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"icl_throughput: {e}")
