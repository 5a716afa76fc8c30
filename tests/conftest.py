"""Shared test infrastructure: the checkout's paths, the `clinical-repro` command in an offline environment
(`run_cli`, or in-process: `run_main`), synthetic releases, and the `--campaign` switch for the long campaigns."""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from clinical_repro.governance import network_guard_env
from clinical_repro.synthetic import write_demo_data

ROOT = Path(__file__).resolve().parents[1]   # the checkout
BIN = Path(sys.executable).parent            # the venv's scripts: clinical-repro, papermill, nbdev-*, jupyter
PARAMS = ROOT / "params"
TEMPLATES = ROOT / "nbs" / "experiments"

# Fault-injection switches act once, on the process they are meant for: never inherited from the caller.
FAULT_SWITCHES = ("CLINICAL_REPRO_CRASH_AT", "CLINICAL_REPRO_CRASH_TAG", "CLINICAL_REPRO_DISK_FULL",
                  "CLINICAL_REPRO_RUNNER_PID")


def cli_env(extra:dict|None=None) -> dict[str, str]:
    "The environment of a `clinical-repro` subprocess: offline, trackers off, one thread, this checkout's params."
    env = {name: value for name, value in os.environ.items() if name not in FAULT_SWITCHES}
    env.update(network_guard_env(offline=True))
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "CLINICAL_REPRO_PARAMS": str(PARAMS), "CLINICAL_REPRO_TEMPLATES": str(TEMPLATES)})
    for name, value in (extra or {}).items():   # a value of None removes the variable
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory):
    """`run_cli(*args, cwd=None, env=None, timeout=900)` runs the console script and returns the CompletedProcess
    (text stdout/stderr). `env` adds to `cli_env()` (None removes a variable); `cwd` defaults to an empty folder."""
    default_cwd = tmp_path_factory.mktemp("cli-cwd")

    def run(*args, cwd=None, env:dict|None=None, timeout:float=900) -> subprocess.CompletedProcess:
        command = [str(BIN / "clinical-repro"), *(str(arg) for arg in args)]
        return subprocess.run(command, capture_output=True, text=True, env=cli_env(env), cwd=cwd or default_cwd,
                              timeout=timeout)
    return run


@pytest.fixture
def run_main(capsys):
    """`run_main(*args)` runs `clinical_repro.cli.main` in this process (no start-up cost) and returns
    (exit code, stdout, stderr); it fails the test when a traceback was printed. The caller's environment applies."""
    from clinical_repro.cli import main

    def run(*args) -> tuple[int, str, str]:
        exit_code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return exit_code, captured.out, captured.err
    return run


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    "The tiny synthetic releases and what the generator says it wrote (read-only: copy before mutating)."
    d = tmp_path_factory.mktemp("tiny")
    written = write_demo_data(d, seed=11, size="tiny")
    return d, written


@pytest.fixture(scope="session")
def mednli_three_shot(tiny_release):
    "Tiny MedNLI, its prompt set, the paper's template, 3 exemplars: (task_data, prompt_set, template, exemplars)."
    from clinical_repro import prompts
    from clinical_repro.data import load_task
    task_data = load_task(tiny_release[0], "mednli")
    prompt_set = prompts.load_prompts("mednli")
    exemplars = prompts.draw_exemplars(task_data.splits["train"], 3, 0, 0, prompts.exemplar_stratum("mednli"))
    return task_data, prompt_set, prompt_set.paper_template(), exemplars


@pytest.fixture
def release(tiny_release, tmp_path):
    "A private, mutable copy of the tiny releases."
    src, written = tiny_release
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def tree_state(root) -> dict:
    "Path -> sha256 of every file under `root`: to show a command wrote nothing."
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def find(root, name) -> Path:
    "The one file called `name` under `root`."
    hits = list(Path(root).rglob(name))
    assert len(hits) == 1, hits
    return hits[0]


def results_by_file(grid_folder) -> dict:
    "Results file name -> (status, test metrics as sorted JSON): what two runs of the same units must share."
    out = {}
    for path in (Path(grid_folder) / "results").glob("*.json"):
        record = json.loads(path.read_text())
        test_metrics = record.get("metrics", {}).get("test")   # a failed unit has none
        out[path.name] = (record["status"], json.dumps(test_metrics, sort_keys=True))
    return out


def no_ray_cluster() -> dict:
    "Environment changes that make `--executor ray` start a private local Ray, whatever the caller's RAY_* say."
    return {name: None for name in os.environ if name.startswith("RAY_")}

# --- a network that fails every connection off this machine and logs the attempt (a sitecustomize) -------------

NETWORK_BLOCK = """
import os, socket
_LOG = os.environ["NET_ATTEMPTS_LOG"]
with open(_LOG + ".processes", "a") as f: f.write(f"{os.getpid()}\\n")   # which processes ran guarded
_LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
def _host(address):
    return address[0] if isinstance(address, tuple) else address
def _blocked(what, address):
    with open(_LOG, "a") as f: f.write(f"{os.getpid()} {what} {address!r}\\n")
    raise OSError(101, f"network blocked by the test: {what} {address!r}")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL: _blocked("connect", address)
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL: _blocked("connect", address)
    return _connect_ex(self, address)
def getaddrinfo(host, *a, **k):
    if host not in _LOCAL and host is not None: _blocked("resolve", host)
    return _getaddrinfo(host, *a, **k)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def network_blocked(folder) -> dict:
    """Environment additions for a `clinical-repro` subprocess whose every Python process (kernels included) fails a
    connection off this machine and logs it to `folder/net-attempts.log` (and its process id to
    `net-attempts.log.processes`); the Hugging Face offline switches unset, so the code under test must keep the
    libraries offline itself."""
    site = Path(folder) / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NETWORK_BLOCK)
    python_path = [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
            "PYTHONPATH": os.pathsep.join(python_path), "NET_ATTEMPTS_LOG": Path(folder) / "net-attempts.log"}


# --- the long campaigns (crash kills, Ray) run in full only when asked -------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--campaign", action="store_true", default=False,
                     help="run the full crash and Ray campaigns (tests marked `campaign`); also "
                          "CLINICAL_REPRO_FULL_CAMPAIGNS=1. Without it a sample of each runs.")


def full_campaigns(config) -> bool:
    "Whether this session runs the full campaigns: `--campaign` or `CLINICAL_REPRO_FULL_CAMPAIGNS=1`."
    return bool(config.getoption("--campaign")) or os.environ.get("CLINICAL_REPRO_FULL_CAMPAIGNS") == "1"


@pytest.fixture(scope="session")
def full_campaign(request) -> bool:
    "True when the full campaigns were asked for; a test sizes its campaign by it (a sample otherwise)."
    return full_campaigns(request.config)


# The files that run whole grids (a minute or more each, see `--durations`), longest first: they start first, so that
# the workers of `pytest -n 2 --dist loadfile` share out the short files at the end and finish together.
LONG_FILES = ["test_crash.py", "test_runner.py", "test_finetune.py", "test_bad_inputs.py", "test_governance_e2e.py",
              "test_icl.py", "test_colab.py", "test_packaging.py", "test_ray.py", "test_ray_grid.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))   # stable: the rest keep their order
    if full_campaigns(config):
        return
    skip = pytest.mark.skip(reason="a full campaign: run with --campaign or CLINICAL_REPRO_FULL_CAMPAIGNS=1")
    for item in items:
        if "campaign" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "campaign: a long campaign (crash kills, Ray), skipped unless --campaign")
    # Under pytest-xdist each worker gets one thread: two workers with two threads each on two cores thrash.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models gain nothing from threads, and on a loaded machine idle threads spinning at each step cost 20x."
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --- tiny random models from configs, offline: tokenizers trained on the synthetic text, a private HF cache --------

# The test metrics (a subset) each task's results file reports: what an end-to-end fine-tuning run must show.
TASK_METRICS = {"mednli": {"accuracy"}, "radqa": {"exact", "f1", "HasAns_f1", "NoAns_f1"},
                "clip": {"micro_f1", "macro_f1", "per_label_f1"}}


def synthetic_texts(data_dir) -> list[str]:
    "The training text of the three tiny releases: a tokenizer's training corpus."
    from clinical_repro.data import load_task
    mednli, radqa, clip = (load_task(data_dir, task) for task in ("mednli", "radqa", "clip"))
    texts = [r.premise + " " + r.hypothesis for r in mednli.splits["train"]]
    texts += [r.question + " " + r.context for r in radqa.splits["train"]]
    return texts + [s.text for note in clip.notes["train"] for s in note.sentences]


def train_byte_level_bpe(folder, texts:list[str], special_tokens:list[str], vocab_size:int=1000) -> Path:
    "A byte-level BPE vocabulary (vocab.json, merges.txt) trained on `texts` into a new `folder`; special tokens first."
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    folder = Path(folder)
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    return folder


def place_in_hub_cache(cache, hub_id:str, folder) -> Path:
    "Copy the model `folder` into the Hugging Face cache `cache` as `hub_id`'s snapshot (what an offline load finds)."
    repo = Path(cache) / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


def save_random_model(model_class, config, folder, seed:int=0) -> None:
    "A `model_class(config)` with weights drawn from `seed` (the caller's random state untouched), saved in `folder`."
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_class(config).save_pretrained(folder)


# ---------------------------------------------------------------- tiny decoders: offline stand-ins for LLMs
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")   # a ChatML template, as SmolLM2's


def chat_tokenizer(chat_template:str|None=CHAT):
    "MiniLM's WordPiece tokenizer (offline) with `chat_template` (None: a base model's tokenizer, without one)."
    from clinical_repro import models
    tok = models.load_tokenizer(models.resolve_model("minilm-demo"))
    tok.chat_template = chat_template
    return tok


def tiny_llama_model(tok, seed:int=0):
    "A tiny seeded random Llama over `tok`'s vocabulary (pad, end and start of sequence: its [PAD], [SEP], [CLS])."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()
