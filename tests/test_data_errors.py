"""Every malformed input: check-data exits non-zero, names the file, the line or record and the expectation,
prints no traceback and writes nothing. One test per case, each on a fresh copy of the tiny synthetic releases."""
import json

import pytest

from clinical_repro.core import DataError
from clinical_repro.data import load_task
from conftest import find, tree_state


def _lines(p):
    return p.read_text().splitlines()


def _write_lines(p, lines):
    p.write_text("\n".join(lines) + "\n")


def _edit_jsonl(release, name, lineno, fn):
    p = find(release, name)
    lines = _lines(p)
    obj = json.loads(lines[lineno - 1])
    lines[lineno - 1] = fn(obj)
    _write_lines(p, lines)
    return p


def _edit_json(release, name, fn):
    p = find(release, name)
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj, indent=1))
    return p


def _qas(obj):
    return [qa for art in obj["data"] for par in art["paragraphs"] for qa in par["qas"]]


def _first(obj, answerable):
    return next(qa for qa in _qas(obj) if qa["is_impossible"] != answerable)


def _emptied(release, task, name):
    "Empty the release file `name`: the loader says the file is empty."
    find(release, name).write_text("")
    return task, name, "", "the file is empty"


def _deleted(release, task, name):
    "Delete one of the release's files: the loader names the task folder and the missing file."
    find(release, name).unlink()
    return task, task, "", f"missing {name}"


def _csv_rows(release):
    p = find(release, "sentence_level.csv")
    return p, _lines(p)


# ---- MedNLI -------------------------------------------------------------------------------------------------

def m_invalid_json(r):
    p = find(r, "mli_dev_v1.jsonl")
    ls = _lines(p)
    ls[2] = ls[2][:-5]
    _write_lines(p, ls)
    return "mednli", p.name, "line 3", "a JSON object per line"

def m_missing_field(r):
    p = _edit_jsonl(r, "mli_train_v1.jsonl", 4, lambda o: json.dumps({k: v for k, v in o.items() if k != "sentence2"}))
    return "mednli", p.name, "line 4", "missing sentence2"

def m_unknown_field(r):
    p = _edit_jsonl(r, "mli_test_v1.jsonl", 2, lambda o: json.dumps({**o, "annotator": "x"}))
    return "mednli", p.name, "line 2", "unknown annotator"

def m_unknown_label(r):
    p = _edit_jsonl(r, "mli_dev_v1.jsonl", 5, lambda o: json.dumps({**o, "gold_label": "-"}))
    return "mednli", p.name, "line 5", "gold_label one of entailment, neutral, contradiction"

def m_duplicate_id(r):
    dev = find(r, "mli_dev_v1.jsonl")
    first_dev = json.loads(_lines(dev)[0])["pairID"]
    p = _edit_jsonl(r, "mli_test_v1.jsonl", 3, lambda o: json.dumps({**o, "pairID": first_dev}))
    return "mednli", p.name, f"pairID {first_dev}", "unique pairIDs across splits"

def m_not_utf8(r):
    p = find(r, "mli_train_v1.jsonl")
    p.write_bytes(p.read_bytes()[:40] + b"\xff\xfe" + p.read_bytes()[40:])
    return "mednli", p.name, "byte 40", "UTF-8 text"

def m_bad_zip(r):
    folder = find(r, "mli_dev_v1.jsonl").parent
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    z = r / "mednli" / "mednli-a-natural-language-inference-dataset-for-the-clinical-domain-1.0.0.zip"
    z.write_bytes(b"PK\x03\x04 this is not really a zip")
    return "mednli", z.name, "", "not a valid zip"

# ---- RadQA --------------------------------------------------------------------------------------------------

def r_invalid_json(r):
    p = find(r, "dev.json")
    t = p.read_text()
    p.write_text(t[: len(t) // 2])
    return "radqa", p.name, "line ", "valid JSON"

def _edit_question(release, name, answerable, change):
    "Apply `change(qa)` to the first (un)answerable question of the RadQA file `name`; (file name, question id)."
    edited = {}
    def edit(obj):
        qa = _first(obj, answerable)
        change(qa)
        edited["id"] = qa["id"]
    p = _edit_json(release, name, edit)
    return p.name, edited["id"]

def _shift_first_answer(qa):
    qa["answers"][0]["answer_start"] += 3

def r_offset_mismatch(r):
    name, question_id = _edit_question(r, "train.json", True, _shift_first_answer)
    return "radqa", name, question_id, "equal to the answer text"

def r_unanswerable_with_answers(r):
    name, question_id = _edit_question(r, "test.json", False,
                                       lambda qa: qa.update(answers=[{"text": "x", "answer_start": 0}]))
    return "radqa", name, question_id, "no answers for an unanswerable question"

def r_answerable_without_answers(r):
    name, question_id = _edit_question(r, "dev.json", True, lambda qa: qa.update(answers=[]))
    return "radqa", name, question_id, "at least one answer for an answerable question"

def r_missing_field(r):
    name, question_id = _edit_question(r, "dev.json", True, lambda qa: qa.pop("is_impossible"))
    return "radqa", name, question_id, "missing is_impossible"

def r_answer_without_text(r):
    "An extra key does not make up for a missing required one."
    name, question_id = _edit_question(r, "train.json", True,
                                       lambda qa: qa["answers"][0].update(answer_end=3) or qa["answers"][0].pop("text"))
    return "radqa", name, question_id, 'answer 0 as {"text": non-empty str, "answer_start": int}'

def r_duplicate_id(r):
    holder = {}
    def f(o):
        a, b = _qas(o)[:2]
        b["id"] = a["id"]
        holder["id"] = a["id"]
    p = _edit_json(r, "train.json", f)
    return "radqa", p.name, holder["id"], "unique question ids"

def r_wrong_shape(r):
    p = find(r, "dev.json")
    p.write_text(json.dumps([{"context": "x"}]))
    return "radqa", p.name, "top level", '"data"'

# ---- CLIP ---------------------------------------------------------------------------------------------------

def c_bad_header(r):
    p, ls = _csv_rows(r)
    ls[0] = "doc_id,sent_index,text,labels"
    _write_lines(p, ls)
    return "clip", p.name, "line 1", "the header doc_id,sent_index,sentence,labels (other columns are ignored); " \
                                     "missing sentence"

def c_wrong_columns(r):
    p, ls = _csv_rows(r)
    ls[3] = ls[3] + ",extra"
    _write_lines(p, ls)
    return "clip", p.name, "line 4", "4 columns"

def _replace_sentence_row(r, index, sentence, labels):
    "Row `index` of sentence_level.csv (0: the header) with new sentence and labels columns; (file name, where)."
    p, ls = _csv_rows(r)
    doc, sent_index = ls[index].split(",")[:2]
    ls[index] = f"{doc},{sent_index},{sentence},{labels}"
    _write_lines(p, ls)
    return p.name, f"line {index + 1} (doc {doc}, sentence {sent_index})"

def c_unparsable_tokens(r):
    name, where = _replace_sentence_row(r, 5, '"[\'Follow\', \'up\'"', "[]")
    return "clip", name, where, "Python-literal list of strings"

def c_unparsable_labels(r):
    name, where = _replace_sentence_row(r, 2, '"[\'Call\', \'us\']"', '"I-Appointment-related followup"')
    return "clip", name, where, "labels as a Python-literal list"

def c_unknown_label(r):
    name, where = _replace_sentence_row(r, 7, '"[\'Eat\', \'less\']"', '"[\'I-Diet-related followup\']"')
    return "clip", name, where, "among the 7 CLIP labels"

def c_duplicate_row(r):
    p, ls = _csv_rows(r)
    ls.insert(3, ls[2])
    _write_lines(p, ls)
    return "clip", p.name, "line 4", "one row per (doc_id, sent_index)"

def c_split_header(r):
    p = find(r, "train_ids.csv")
    p.write_text("doc_id\n" + p.read_text())
    return "clip", p.name, "line 1", "no header"

def c_split_unknown_doc(r):
    p = find(r, "val_ids.csv")
    p.write_text(p.read_text() + "999999991\n")
    return "clip", p.name, "doc 999999991", "a doc_id present in sentence_level.csv"

def c_doc_in_two_splits(r):
    tr = find(r, "train_ids.csv")
    doc = _lines(tr)[0].strip()
    p = find(r, "test_ids.csv")
    p.write_text(p.read_text() + doc + "\n")
    return "clip", p.name, f"doc {doc}", "each note in one split only"

def c_sentence_gap(r):
    p, ls = _csv_rows(r)
    doc = ls[1].split(",")[0]
    del ls[2]  # the note's sentence 1
    _write_lines(p, ls)
    return "clip", p.name, f"doc {doc}", "without gaps"

def _named(name, mutate):
    mutate.__name__ = name
    return mutate

# An empty or a missing file, per task (the same two mutations, named for the test ids).
m_empty_split = _named("m_empty_split", lambda r: _emptied(r, "mednli", "mli_test_v1.jsonl"))
m_missing_split = _named("m_missing_split", lambda r: _deleted(r, "mednli", "mli_dev_v1.jsonl"))
r_missing_split = _named("r_missing_split", lambda r: _deleted(r, "radqa", "test.json"))
c_empty_split = _named("c_empty_split", lambda r: _emptied(r, "clip", "test_ids.csv"))
c_missing_split = _named("c_missing_split", lambda r: _deleted(r, "clip", "val_ids.csv"))

CASES = [m_invalid_json, m_missing_field, m_unknown_field, m_unknown_label, m_duplicate_id, m_empty_split,
         m_missing_split, m_not_utf8, m_bad_zip, r_invalid_json, r_offset_mismatch, r_unanswerable_with_answers,
         r_answerable_without_answers, r_missing_field, r_answer_without_text, r_duplicate_id, r_missing_split,
         r_wrong_shape, c_bad_header, c_wrong_columns, c_unparsable_tokens, c_unparsable_labels, c_unknown_label, c_duplicate_row,
         c_split_header, c_split_unknown_doc, c_doc_in_two_splits, c_empty_split, c_missing_split, c_sentence_gap]


@pytest.mark.parametrize("mutate", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_reported_clearly(release, mutate, run_main):
    task, fname, where, expected = mutate(release)
    before = tree_state(release)
    rc, out, _ = run_main("check-data", "--data-dir", release, "--json")   # fails on a printed traceback
    assert rc == 1
    report = json.loads(out)
    assert report[task]["status"] == "invalid"
    others = [t for t in report if t != task]
    assert all(report[t]["status"] == "ok" for t in others)  # one bad task leaves the others reported as valid
    hits = [e for e in report[task]["errors"] if fname in e and where in e and expected in e]
    assert hits, f"no error names {fname!r}, {where!r}, {expected!r}: {report[task]['errors']}"
    assert tree_state(release) == before  # nothing written
    with pytest.raises(DataError):
        load_task(release, task)


def test_console_script_prints_no_traceback(release, run_cli):
    c_unknown_label(release)
    r = run_cli("check-data", "--data-dir", release)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert "sentence_level.csv: line 8" in r.stdout and "among the 7 CLIP labels" in r.stdout


def test_not_a_folder_is_a_usage_error(tmp_path, run_main):
    rc, _, err = run_main("check-data", "--data-dir", tmp_path / "nope")
    assert rc == 2 and "expected a folder holding mednli/, radqa/ and clip/" in err


# ---- Extra keys and columns: warnings, not errors ---------------------------------------------------------------

def _add_extras(release):
    "Keys and columns beyond the documented ones, as a real release may carry; returns the expected warnings."
    counts = {}
    def radqa_extras(obj):
        obj["release"] = "1.0.0"
        for article in obj["data"]:
            article["report_type"] = "CT"
        for qa in _qas(obj):
            qa["difficulty"] = 1
            for answer in qa["answers"]:
                answer["answer_end"] = answer["answer_start"] + len(answer["text"])
        counts["questions"], counts["articles"] = len(_qas(obj)), len(obj["data"])
        counts["answers"] = sum(len(qa["answers"]) for qa in _qas(obj))
    radqa_file = _edit_json(release, "train.json", radqa_extras).relative_to(release / "radqa").as_posix()
    p, ls = _csv_rows(release)
    _write_lines(p, [ls[0] + ",note_type"] + [line + ",Discharge summary" for line in ls[1:]])
    place = "data[].paragraphs[].qas[]."
    return {"radqa": [{"file": radqa_file, "kind": "key", "name": name, "count": n} for name, n in sorted(
                {"release": 1, "data[].report_type": counts["articles"], f"{place}difficulty": counts["questions"],
                 f"{place}answers[].answer_end": counts["answers"]}.items())],
            "clip": [{"file": p.relative_to(release / "clip").as_posix(), "kind": "column", "name": "note_type",
                      "count": len(ls) - 1}]}


def test_extra_keys_and_columns_are_warnings_with_counts(release, run_main, capsys):
    before = {task: load_task(release, task) for task in ("radqa", "clip")}
    expected = _add_extras(release)
    rc, out, _ = run_main("check-data", "--data-dir", release, "--json")
    assert rc == 0   # warnings do not fail the check
    report = json.loads(out)
    for task, warnings in expected.items():
        assert report[task]["status"] == "ok"
        assert report[task]["warnings"] == warnings
        after = load_task(release, task)
        assert after.splits == before[task].splits   # the extras change no record
    assert report["mednli"]["warnings"] == []
    rc, out, _ = run_main("check-data", "--data-dir", release)
    assert rc == 0
    assert f"warning: {expected['radqa'][0]['file']}: unknown key data[].paragraphs[].qas[].difficulty in " \
           f"{expected['radqa'][1]['count']} objects: ignored" in out
    assert f"unknown column note_type in {expected['clip'][0]['count']} rows: ignored" in out
