"""An independent, deliberately literal statement of the SQuAD 2.0 evaluation rules (evaluate-v2.0), used only
as a reference in tests. Written from the published rules; it shares no code with clinical_repro.metrics."""
import collections, re, string

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1(gold, pred):
    g, p = normalize(gold).split(), normalize(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((collections.Counter(g) & collections.Counter(p)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def evaluate(golds, preds, na_probs=None, thresh=1.0):
    """golds: {qid: [answer texts]} ([] = unanswerable). Returns the official script's output dict."""
    has_ans = {q: bool(a) for q, a in golds.items()}
    exact_raw, f1_raw = {}, {}
    for q, answers in golds.items():
        gold = [a for a in answers if normalize(a)] or [""]
        exact_raw[q] = max(float(normalize(a) == normalize(preds[q])) for a in gold)
        f1_raw[q] = max(f1(a, preds[q]) for a in gold)
    probs = na_probs if na_probs is not None else {q: 0.0 for q in golds}

    def thresholded(raw):
        return {q: (float(not has_ans[q]) if probs[q] > thresh else s) for q, s in raw.items()}

    def block(ex, f, qids):
        n = len(qids)
        return {"exact": 100.0 * sum(ex[q] for q in qids) / n, "f1": 100.0 * sum(f[q] for q in qids) / n, "total": n}

    ex, f = thresholded(exact_raw), thresholded(f1_raw)
    out = block(ex, f, list(golds))
    for name, want in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in golds if has_ans[q] == want]
        if qids:
            out.update({f"{name}_{k}": v for k, v in block(ex, f, qids).items()})
    if na_probs is not None:
        for key, raw in (("exact", exact_raw), ("f1", f1_raw)):
            score = best = sum(1 for q in golds if not has_ans[q])
            best_t = 0.0
            for q in sorted(na_probs, key=lambda k: na_probs[k]):
                score += raw[q] if has_ans[q] else (-1 if preds[q] else 0)
                if score > best:
                    best, best_t = score, na_probs[q]
            out[f"best_{key}"] = 100.0 * best / len(golds)
            out[f"best_{key}_thresh"] = best_t
    return out
