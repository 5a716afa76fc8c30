"""The open-weight LLMs of params/llm-icl.yaml as their checkpoints are shaped, on tiny seeded random stand-ins built
here (no download): an instruct chat template without a system role (Mistral-7B-Instruct-v0.1, BioMistral-7B), base
models without a chat template (Llama-2-7B, Meditron-7B: plain text), and Gemma 3's image-text checkpoint
(Gemma3ForConditionalGeneration: MedGemma 4B-it, Gemma 3 4B-it), each through a whole in-context unit."""
import json, os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conftest import CHAT, chat_tokenizer, tiny_llama_model
from clinical_repro import icl, models, prompts
from clinical_repro.core import UserError
from clinical_repro.models import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one torch thread (tests/conftest.py)

# Mistral-7B-Instruct-v0.1's kind of template: strict user/assistant alternation, no system role
NO_SYSTEM = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}[SEP]{% endif %}"
             "{% endfor %}")


def _tokenizer(chat_template):
    "`chat_tokenizer(chat_template)` with no length limit of its own, as LLM tokenizers ship."
    tok = chat_tokenizer(chat_template)
    tok.model_max_length = int(1e30)   # as LLM tokenizers ship it (no limit of their own): the model's positions rule
    return tok


def _gemma3(tok):
    "Gemma 3's image-text architecture (a SigLIP tower beside the language model), as MedGemma 4B-it ships it."
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                            sliding_window=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                            bos_token_id=tok.cls_token_id)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


def _saved(folder, tok, build) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(tok).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "The registry with four tiny decoders shaped like the LLM grid's checkpoints."
    entries = {"tiny-no-system": (NO_SYSTEM, tiny_llama_model, {}),
               "tiny-base": (None, tiny_llama_model, {"prompt_layout": "text"}),
               "tiny-base-as-chat": (None, tiny_llama_model, {}), "tiny-gemma3": (CHAT, _gemma3, {}),
               "tiny-processor-template": (None, _gemma3, {})}
    registry = models.load_registry()
    for name, (template, build, fields) in entries.items():
        folder = _saved(tmp_path_factory.mktemp(name), _tokenizer(template), build)
        registry[name] = ModelSpec(paper_name=name, local_path=folder, family="decoder", domain="general",
                                   size_m=0.1, modes=["icl"], has_mlm_head=False, **fields)
    # an image-text release whose template is its processor's alone (chat_template.json), as some Gemma 3 ones ship
    folder = registry["tiny-processor-template"].local_path
    (Path(folder)/"chat_template.json").write_text(json.dumps({"chat_template": CHAT}))
    return registry


def test_a_template_without_a_system_role_gets_the_instruction_in_the_first_user_turn():
    tok = _tokenizer(NO_SYSTEM)
    parts = prompts.PromptParts(instruction="Answer yes or no.", exemplars=[("Is it red?", "yes")], query="Is it?")
    assert icl.chat_prompt(tok, parts) == "[INST] Answer yes or no.\n\nIs it red? [/INST]yes[SEP][INST] Is it? [/INST]"
    with pytest.raises(Exception, match="roles must alternate"):   # what the template says to a system turn
        tok.apply_chat_template(icl.chat_messages(parts), tokenize=False)


@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_mistral_v01_like_and_gemma3_image_text_checkpoints_run_in_context(tiny_release, registry, tmp_path, task):
    data, _ = tiny_release
    for model in ("tiny-no-system", "tiny-gemma3"):
        saved = icl.run_icl_unit(task, model, data, tmp_path, shots=1, limit=3, dev_n=3, registry=registry)
        assert saved["status"] == "ok" and saved["counts"]["test"] == 3
        assert saved["config"]["prompt_layout"] == "dev"   # both chat layouts tried on dev, through the template
        assert all(layout.startswith("chat_") for layout in
                   ([saved["prompt_layout"]] if task != "clip" else saved["prompt_layout"].values()))
        assert saved["cost"]["tokens_in"] > 0
    # Gemma 3's limits live in its text config: the budget is its 2,048 positions, not a 512 fallback
    assert saved["truncation"]["budget"] == 2048


@pytest.mark.parametrize("task", ["mednli", "radqa"])
def test_a_base_model_reads_plain_text_and_its_reply_ends_at_the_line_break(tiny_release, registry, tmp_path, task):
    data, _ = tiny_release
    saved = icl.run_icl_unit(task, "tiny-base", data, tmp_path, shots=1, limit=4, dev_n=4, registry=registry)
    assert saved["status"] == "ok" and saved["config"]["prompt_layout"] == "text"
    raw = json.loads((tmp_path/saved["predictions"]).read_text())["test"][task]["raw"]
    assert len(raw) == 4 and not any("\n" in reply for reply in raw.values())


def test_a_base_model_read_as_chat_fails_with_the_remedy_and_writes_no_results(tiny_release, registry, tmp_path):
    data, _ = tiny_release
    with pytest.raises(UserError, match="prompt_layout: text"):
        icl.run_icl_unit("mednli", "tiny-base-as-chat", data, tmp_path, shots=1, limit=2, dev_n=2, registry=registry)
    assert not list(tmp_path.glob("*.json"))


def test_llm_grid_base_models_read_plain_text():
    registry = models.load_registry()
    assert {name for name, spec in registry.items() if spec.prompt_layout == "text"} == {"meditron-7b", "llama-2-7b"}
    with pytest.raises(ValueError, match="only decoders"):
        ModelSpec(paper_name="x", hub_id="x/y", family="encoder", domain="general", size_m=1, modes=["icl"],
                  has_mlm_head=False, prompt_layout="text")


def test_gemma3_sliding_window_scores_and_replies_equal_direct_passes(registry):
    """Prompts longer than the sliding window (64 tokens), options scored after the replies (the cache is rolled back
    over the window): every option's log-probability = one full forward pass; every reply = transformers' generate."""
    resolved = models.resolve_model("tiny-gemma3", registry)
    tok, model = models.load_tokenizer(resolved), models.load_model(resolved, "causal-lm").eval()
    shared = " ".join(["the patient was seen in clinic today"] * 12)
    texts = [icl.chat_prompt(tok, f"{shared} question {i} {'and more words ' * i}answer:") for i in range(3)]
    assert min(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) > 64
    options = ["yes", "no", "not at all"]
    sums, _, replies, _, _ = icl.causal_prompt_pass(model, tok, texts, options, max_new_tokens=6, batch_size=3)
    with torch.no_grad():
        for row, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for column, option in enumerate(options):
                option_ids = tok(option, add_special_tokens=False)["input_ids"]
                logprobs = model(torch.tensor([ids + option_ids])).logits[0].float().log_softmax(-1)
                direct = sum(float(logprobs[len(ids) - 1 + k, t]) for k, t in enumerate(option_ids))
                assert sums[row, column] == pytest.approx(direct, abs=1e-4)
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            assert replies[row] == tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_a_tokenizer_without_a_template_reads_its_processors(registry, tiny_release, tmp_path):
    "Only chat_template.json holds the template: the tokenizer takes it, and a whole unit reads chat turns."
    resolved = models.resolve_model("tiny-processor-template", registry)
    assert models.load_tokenizer(resolved).chat_template == CHAT
    assert models.load_tokenizer(models.resolve_model("tiny-base", registry)).chat_template is None   # none there
    saved = icl.run_icl_unit("mednli", "tiny-processor-template", tiny_release[0], tmp_path, shots=1, limit=2,
                             dev_n=2, registry=registry)
    assert saved["status"] == "ok" and saved["prompt_layout"] in ("chat_turns", "chat_inline")
    (Path(resolved.source)/"chat_template.json").write_text("[1, 2]")   # a broken file: named, not ignored
    try:
        with pytest.raises(UserError, match=r"chat_template.json: expected a JSON object with a chat_template"):
            models.load_tokenizer(resolved)
    finally:
        (Path(resolved.source)/"chat_template.json").write_text(json.dumps({"chat_template": CHAT}))
