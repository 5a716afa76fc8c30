"""The synthetic releases: exact PhysioNet layouts and fields, counts as returned, determinism per seed,
RadQA offsets and unanswerable share, CLIP label names, safety of --out, and learnable-but-not-trivial data."""
import ast, csv, json, re, uuid
from collections import Counter
from pathlib import Path

import pytest

import yaml

from clinical_repro.config import params_file
from clinical_repro.core import SPLITS, DataError, UserError
from clinical_repro.synthetic import (CLIP_ID_FILES, CLIP_RELEASE, DEMO_MARKER, DEMO_SIZES, MEDNLI_FILES,
                                      MEDNLI_RELEASE, RADQA_FILES, RADQA_RELEASE, VOCABULARY_FILE,
                                      bag_of_words_baselines, mednli_split, read_vocabulary, shortcut_scores,
                                      tokenize, write_demo_data)
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS
from conftest import tree_state

SNLI_FIELDS = {"pairID", "gold_label", "sentence1", "sentence2", "sentence1_parse", "sentence2_parse",
               "sentence1_binary_parse", "sentence2_binary_parse"}


def _mednli(root, split):
    lines = (Path(root)/MEDNLI_RELEASE/MEDNLI_FILES[split]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _radqa(root, split):
    return json.loads((Path(root)/RADQA_RELEASE/RADQA_FILES[split]).read_text(encoding="utf-8"))


def _qas(obj):
    return [(par["context"], qa) for art in obj["data"] for par in art["paragraphs"] for qa in par["qas"]]


def _clip_rows(root):
    with open(Path(root)/CLIP_RELEASE/"sentence_level.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _clip_ids(root, split):
    return (Path(root)/CLIP_RELEASE/CLIP_ID_FILES[split]).read_text().splitlines()


def test_exactly_the_released_files(tiny_release):
    root, _ = tiny_release
    expected = {DEMO_MARKER} | {f"{MEDNLI_RELEASE}/{f}" for f in MEDNLI_FILES.values()} \
        | {f"{RADQA_RELEASE}/{f}" for f in RADQA_FILES.values()} \
        | {f"{CLIP_RELEASE}/{f}" for f in (*CLIP_ID_FILES.values(), "sentence_level.csv")}
    assert set(tree_state(root)) == expected
    assert MEDNLI_RELEASE.endswith("mednli-a-natural-language-inference-dataset-for-the-clinical-domain-1.0.0")
    assert set(MEDNLI_FILES.values()) == {"mli_train_v1.jsonl", "mli_dev_v1.jsonl", "mli_test_v1.jsonl"}
    assert set(CLIP_ID_FILES.values()) == {"train_ids.csv", "val_ids.csv", "test_ids.csv"}
    assert "SYNTHETIC" in json.loads((root/DEMO_MARKER).read_text())["note"]


def test_mednli_has_all_eight_snli_fields(tiny_release):
    root, _ = tiny_release
    ids = []
    for split in SPLITS:
        recs = _mednli(root, split)
        for r in recs:
            assert set(r) == SNLI_FIELDS
            assert r["gold_label"] in MEDNLI_LABELS and r["sentence1"].strip() and r["sentence2"].strip()
            uuid.UUID(r["pairID"])
            for k in ("sentence1_parse", "sentence2_parse"):
                assert r[k].startswith("(ROOT (S ") and r[k].count("(") == r[k].count(")")
            for k in ("1", "2"):
                b = r[f"sentence{k}_binary_parse"]
                assert b.count("(") == b.count(")")
                leaves = [t for t in b.split() if t not in "()"]
                assert leaves == [{"(": "-LRB-", ")": "-RRB-"}.get(t, t) for t in tokenize(r[f"sentence{k}"])]
        counts = Counter(r["gold_label"] for r in recs)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced, as released
        ids += [r["pairID"] for r in recs]
    assert len(set(ids)) == len(ids)


def test_radqa_is_squad2_with_exact_offsets(tiny_release):
    root, _ = tiny_release
    all_qas, ids = [], []
    for split in SPLITS:
        obj = _radqa(root, split)
        assert set(obj) == {"version", "data"} and obj["version"] == "v2.0"
        for art in obj["data"]:
            assert set(art) == {"title", "paragraphs"} and isinstance(art["title"], str)
            for par in art["paragraphs"]:
                assert set(par) == {"context", "qas"}
                assert all(h in par["context"] for h in ("EXAMINATION:", "INDICATION:", "FINDINGS:", "IMPRESSION:"))
                for qa in par["qas"]:
                    assert set(qa) == {"id", "question", "is_impossible", "answers"}
                    if qa["is_impossible"]:
                        assert qa["answers"] == []
                    else:
                        [a] = qa["answers"]
                        assert set(a) == {"text", "answer_start"} and a["text"]
                        assert par["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
        all_qas += _qas(obj)
        ids += [qa["id"] for _, qa in _qas(obj)]
    assert len(set(ids)) == len(ids)  # unique across splits
    share = sum(qa["is_impossible"] for _, qa in all_qas) / len(all_qas)
    assert abs(share - 0.28) <= 0.03
    answers = [qa["answers"][0]["text"] for _, qa in all_qas if not qa["is_impossible"]]
    assert 0.03 <= sum("\n" in t for t in answers) / len(answers) <= 0.35   # some answers span a line break
    assert max(len(t.split()) for t in answers) >= 15                        # and some are long


def test_radqa_unanswerable_questions_are_about_unmentioned_things(tiny_release):
    root, _ = tiny_release
    topics = {"pleural effusion": "effusion", "pneumothorax": "pneumothorax", "nodule": "nodule",
              "endotracheal tube": "endotracheal", "rib fractures": "fracture"}
    checked = 0
    for ctx, qa in _qas(_radqa(root, "train")):
        for phrase, word in topics.items():
            if qa["is_impossible"] and phrase in qa["question"]:
                assert word not in ctx.lower()
                checked += 1
    assert checked


def test_clip_csv_and_split_files(tiny_release):
    root, _ = tiny_release
    assert (root/CLIP_RELEASE/"sentence_level.csv").read_text().splitlines()[0] == "doc_id,sent_index,sentence,labels"
    header, rows = _clip_rows(root)
    by_doc, labels = {}, []
    for doc, idx, sent, labs in rows:
        toks, ls = ast.literal_eval(sent), ast.literal_eval(labs)
        assert isinstance(toks, list) and toks and all(isinstance(t, str) and t and " " not in t for t in toks)
        assert isinstance(ls, list) and all(l.startswith("I-") and l[2:] in CLIP_LABELS for l in ls)
        by_doc.setdefault(int(doc), []).append(int(idx))
        labels.append(ls)
    assert all(ix == list(range(len(ix))) for ix in by_doc.values())
    lo, hi = DEMO_SIZES["tiny"].clip_sentences
    assert all(lo <= len(ix) <= hi for ix in by_doc.values())
    assert {l[2:] for ls in labels for l in ls} == set(CLIP_LABELS)
    assert 0.72 <= sum(not ls for ls in labels) / len(labels) <= 0.88   # most sentences carry no label
    assert any(len(ls) == 2 for ls in labels)
    ids = {s: _clip_ids(root, s) for s in SPLITS}
    assert all(line.isdigit() for s in SPLITS for line in ids[s])    # no header
    flat = [int(d) for s in SPLITS for d in ids[s]]
    assert len(flat) == len(set(flat)) and set(flat) == set(by_doc)  # disjoint, covering every note


def test_returned_counts_are_what_is_on_disk(tiny_release):
    root, written = tiny_release
    spec = DEMO_SIZES["tiny"]
    _, rows = _clip_rows(root)
    for i, split in enumerate(SPLITS):
        recs = _mednli(root, split)
        label_counts = {label: sum(r["gold_label"] == label for r in recs) for label in MEDNLI_LABELS}
        assert written["mednli"][split] == {"items": len(recs), "labels": label_counts}
        assert len(recs) == spec.mednli_pairs[i]
        qas = _qas(_radqa(root, split))
        un = sum(qa["is_impossible"] for _, qa in qas)
        assert written["radqa"][split] == {"items": len(qas), "answerable": len(qas) - un, "unanswerable": un}
        assert len(qas) == spec.radqa_questions[i]
        docs = set(_clip_ids(root, split))
        mine = [ast.literal_eval(labs) for doc, _, _, labs in rows if doc in docs]
        counts = Counter(l[2:] for ls in mine for l in ls)
        assert written["clip"][split] == {"notes": len(docs), "items": len(mine),
                                          "labels": {l: counts[l] for l in CLIP_LABELS}}
        assert len(docs) == spec.clip_notes[i]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a, b, c = (write_demo_data(tmp_path/n, seed=s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert a == b
    fa, fb, fc = tree_state(tmp_path/"a"), tree_state(tmp_path/"b"), tree_state(tmp_path/"c")
    assert fa == fb
    assert all(fa[k] != fc[k] for k in fa if k != DEMO_MARKER)


def test_sizes_and_errors(tmp_path):
    assert set(DEMO_SIZES) == {"tiny", "demo"}
    with pytest.raises(UserError, match="expected one of tiny, demo"):
        write_demo_data(tmp_path/"x", size="huge")
    f = tmp_path/"file"
    f.write_text("x")
    with pytest.raises(UserError, match="expected a folder"):
        write_demo_data(f)
    assert f.read_text() == "x" and not (tmp_path/"x").exists()


def test_out_may_hold_other_things_but_never_a_foreign_release(tmp_path):
    (tmp_path/"notes.txt").write_text("mine")
    write_demo_data(tmp_path, seed=1)
    first = tree_state(tmp_path)
    write_demo_data(tmp_path, seed=2)                       # a previous demo dir may be overwritten
    assert tree_state(tmp_path) != first and (tmp_path/"notes.txt").read_text() == "mine"
    other = tmp_path/"other"
    real = other/MEDNLI_RELEASE/MEDNLI_FILES["train"]
    real.parent.mkdir(parents=True)
    real.write_text("real data\n")
    with pytest.raises(UserError, match="not written by demo-data"):
        write_demo_data(other)
    assert real.read_text() == "real data\n" and not (other/DEMO_MARKER).exists()
    assert not list(other.rglob(".*.tmp"))                 # nothing half-written left behind


def test_demo_data_is_learnable_but_not_trivial(tmp_path):
    write_demo_data(tmp_path, seed=0, size="demo")
    b = bag_of_words_baselines(tmp_path)
    assert b["mednli_chance"] + 0.12 <= b["mednli_accuracy"] <= 0.97
    assert b["clip_chance_f1"] + 0.2 <= b["clip_any_label_f1"] <= 0.97


def _lookup_accuracy(keys_train, y_train, keys_test, y_test) -> float:
    "Accuracy of predicting, for each test key, the train split's majority label of that key (else the majority)."
    by_key = {}
    for k, y in zip(keys_train, y_train): by_key.setdefault(k, Counter())[y] += 1
    majority = Counter(y_train).most_common(1)[0][0]
    predicted = [by_key[k].most_common(1)[0][0] if k in by_key else majority for k in keys_test]
    return sum(p == y for p, y in zip(predicted, y_test)) / len(y_test)


def test_length_and_template_alone_stay_near_the_majority_baseline(tmp_path):
    "The leak check on the demo data's test split: text length or template alone tells (almost) nothing."
    from sklearn.linear_model import LogisticRegression
    write_demo_data(tmp_path, seed=0, size="demo")
    train, test = _mednli(tmp_path, "train"), _mednli(tmp_path, "test")
    length = lambda recs: [[len(tokenize(r["sentence2"])), len(tokenize(r["sentence1"]))] for r in recs]
    labels = lambda recs: [r["gold_label"] for r in recs]
    by_length = LogisticRegression(max_iter=2000).fit(length(train), labels(train)).score(length(test), labels(test))
    assert by_length <= 1 / 3 + 0.08  # 150 test pairs: one standard error is .04
    scores = shortcut_scores(tmp_path)
    assert scores["mednli"]["majority"] == pytest.approx(1 / 3)
    for task in ("mednli", "radqa", "clip"):
        assert scores[task]["length"] <= scores[task]["majority"] + 0.08, task
    unanswerable = lambda obj: [qa["is_impossible"] for _, qa in _qas(obj)]
    questions = lambda obj: [qa["question"] for _, qa in _qas(obj)]
    train_q, test_q = _radqa(tmp_path, "train"), _radqa(tmp_path, "test")
    by_question = _lookup_accuracy(questions(train_q), unanswerable(train_q), questions(test_q), unanswerable(test_q))
    assert by_question == pytest.approx(scores["radqa"]["template"])
    assert by_question <= scores["radqa"]["majority"] + 0.08


def test_mednli_hypothesis_length_and_predicate_say_little_about_the_label():
    "On 3000 pairs per split: a hypothesis's length is at chance; its predicate alone is far from enough."
    from sklearn.tree import DecisionTreeClassifier
    train, test = mednli_split(0, "train", 3000), mednli_split(0, "test", 3000)
    labels = lambda recs: [r["gold_label"] for r in recs]
    length = lambda recs: [[len(tokenize(r["sentence2"]))] for r in recs]
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(length(train), labels(train))
    assert tree.score(length(test), labels(test)) <= 1 / 3 + 0.03   # was .379: neutral hypotheses were longer
    predicate = lambda recs: [r["sentence2"].rstrip(".").split(" ", 1)[1] for r in recs]
    # was .733: most predicates were written for one label only; now neutral often borrows another premise's
    assert _lookup_accuracy(predicate(train), labels(train), predicate(test), labels(test)) <= 0.70


def test_the_vocabulary_is_a_params_file_of_words_not_study_parameters():
    path = params_file(VOCABULARY_FILE)
    assert path.name == "synthetic.yaml"
    head = path.read_text(encoding="utf-8").splitlines()[:8]
    assert head[0].startswith("# Vocabulary of the synthetic demo data generator")
    assert any("NOT study parameters" in line for line in head)
    words = read_vocabulary()
    assert words == read_vocabulary(path)
    # YAML kept what the tables were: ints stay ints, decimals stay floats, "None" stays text
    values = {lab.phrase: lab.values for lab in words.mednli.labs}
    assert values["a sodium of {v}"] == (112, 128) and all(type(v) is int for v in values["a sodium of {v}"])
    assert values["a potassium of {v}"] == (6.0, 7.4) and all(type(v) is float for v in values["a potassium of {v}"])
    assert words.clip.slots["invasive"][:2] == ("None", "None") and words.clip.early["hpi"] is None
    assert set(words.clip.labelled) == set(CLIP_LABELS)


def _broken_vocabulary(tmp_path, edit) -> Path:
    data = yaml.safe_load((params_file(VOCABULARY_FILE)).read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path/"synthetic.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["mednli"].pop("labs"), "mednli.labs: Field required"),
    (lambda d: d.pop("radqa"), "radqa: Field required"),
    (lambda d: d["clip"]["slots"].pop("allergy"), "clip.slots.allergy"),
    (lambda d: d["clip"]["labelled"].pop("Lab-related followup"), "clip.labelled.Lab-related followup"),
    (lambda d: d["clip"]["early"].update(hpi=["x"]), "clip.early.hpi"),
    (lambda d: d["mednli"].update(subjects=[]), "mednli.subjects"),
    (lambda d: d["clip"]["slots"].update(invasive=[None, True]), "clip.slots.invasive.0"),   # unquoted None / yes
    (lambda d: d["mednli"]["labs"][0].update(typo=1), "mednli.labs.0.typo: unknown key"),
])
def test_a_missing_or_malformed_table_names_the_file_and_the_key(tmp_path, edit, key):
    path = _broken_vocabulary(tmp_path, edit)
    with pytest.raises(DataError) as e:
        read_vocabulary(path)
    assert f"{path}: {key}" in str(e.value)



def test_demo_data_written_by_another_generator_version_is_written_again(tmp_path):
    "A cached copy from an older generator (a package upgrade changed the data) is not used as if it were current."
    from clinical_repro import units
    from clinical_repro.synthetic import generator_version
    folder = units.ensure_demo_data(tmp_path/"demo", size="tiny", seed=0)
    marker_file = folder/DEMO_MARKER
    test_file = next(folder.rglob("mli_test_v1.jsonl"))
    current = test_file.read_bytes()
    assert json.loads(marker_file.read_text())["generator"] == generator_version()
    assert units.demo_data_complete(folder, "tiny", 0)
    marker = json.loads(marker_file.read_text())
    marker_file.write_text(json.dumps({**marker, "generator": "an-older-one"}))
    test_file.write_text("written by an older generator\n")
    assert not units.demo_data_complete(folder, "tiny", 0)
    units.ensure_demo_data(folder, size="tiny", seed=0)
    assert test_file.read_bytes() == current
    assert units.demo_data_complete(folder, "tiny", 0)
