"""ICL prompts: strict YAML, the paper's wordings, prompt building that never cuts the instruction or the question
under any budget, reproducible stratified exemplar draws that exclude the evaluated item, and the fixed dev sample."""
import json, os, random, shutil, subprocess, sys
from collections import Counter
from pathlib import Path

import pytest

from clinical_repro.config import default_params_dir
from clinical_repro.core import DataError, UserError
from clinical_repro.tasks import CLIP_LABELS, MEDNLI_LABELS
from clinical_repro.data import load_task
from clinical_repro.prompts import (build_prompt, choose_template, dev_sample, draw_exemplars, exemplar_ids,
                                    exemplar_stratum, is_no_answer, load_prompts, map_no_answer, prompt_version,
                                    read_prompts, record_fields, verbalize)

ROOT = Path(__file__).resolve().parents[1]


def words(s):
    "A whitespace tokenizer: tokens = words."
    return len(s.split())


def chars4(s):
    "A rough subword tokenizer: one token per 4 characters."
    return (len(s) + 3) // 4


@pytest.fixture(scope="module")
def data(tiny_release):
    d, _ = tiny_release
    return {t: load_task(d, t) for t in ("mednli", "radqa", "clip")}


@pytest.fixture
def params_copy(tmp_path):
    "A private copy of params/prompts to break."
    dst = tmp_path / "params"
    shutil.copytree(default_params_dir() / "prompts", dst / "prompts")
    return dst


# ---- templates -------------------------------------------------------------------------------------------------

def test_yaml_loads_with_paper_wording():
    m, r, c = load_prompts("mednli"), load_prompts("radqa"), load_prompts("clip")
    assert len(m.templates) >= 4 and len(r.templates) >= 4
    assert m.paper_template().instruction == "Answer entailment, contradiction or neutral."
    assert "{premise}" in m.paper_template().query and "{hypothesis}" in m.paper_template().query
    assert set(m.verbalizers) == set(MEDNLI_LABELS)
    assert "N/A" in r.paper_template().instruction and "quot" in r.paper_template().instruction.lower()
    assert r.no_answer_verbalizations == ["N/A", "n/a", "none", "no answer", "not mentioned"]
    assert c.paper_template().variant == "per_label"
    assert {t.variant for t in c.templates} == {"per_label", "list"}
    assert set(c.label_questions) == set(CLIP_LABELS) and len(set(c.label_questions.values())) == 7
    assert (c.verbalizers["positive"], c.verbalizers["negative"]) == ("Yes", "No")
    for t in ("mednli", "radqa", "clip"):
        v = prompt_version(t)
        assert v.startswith("v1-") and v == prompt_version(t)


def test_unknown_key_names_file_and_key(params_copy):
    f = params_copy / "prompts" / "radqa.yaml"
    f.write_text(f.read_text().replace("    separator:", "    seperator:", 1))
    with pytest.raises(DataError) as e:
        load_prompts("radqa", params_copy)
    assert str(f) in str(e.value) and "templates.0.seperator: unknown key" in str(e.value)
    g = params_copy / "prompts" / "mednli.yaml"
    g.write_text("colour: blue\n" + g.read_text())
    with pytest.raises(DataError, match="colour: unknown key"):
        load_prompts("mednli", params_copy)


@pytest.mark.parametrize("old,new,key", [
    ("{question} Answer N/A if there is no answer or give a quote from the context:\"",
     # question dropped
     "Answer N/A if there is no answer or give a quote from the context:\"", "templates.0 (paper).query"),
    ('query: "Context: {context}', 'query: "Context: {report}', "templates.0 (paper).query"),  # unknown field
    ("context: {answer}\"", "context: {answr}\"", "templates.0 (paper).example"),
    ('instruction: "Answer N/A if there is', 'instruction: "Answer N/A if {context} is',
     "templates.0 (paper).instruction"),
])
def test_placeholders_checked(params_copy, old, new, key):
    f = params_copy / "prompts" / "radqa.yaml"
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))
    with pytest.raises(DataError) as e:
        read_prompts(f)
    assert f"{f}: {key}" in str(e.value)


def test_other_structural_errors(params_copy):
    f = params_copy / "prompts" / "mednli.yaml"
    f.write_text(f.read_text().replace("source: paper", "source: ours"))
    with pytest.raises(DataError, match="source: paper"):
        read_prompts(f)
    c = params_copy / "prompts" / "clip.yaml"
    c.write_text(c.read_text().replace("Lab-related followup, Procedure", "Procedure", 1))
    with pytest.raises(DataError, match="missing: Lab-related followup"):
        read_prompts(c)


# ---- answers -----------------------------------------------------------------------------------------------------

def test_verbalize_and_no_answer():
    r = load_prompts("radqa")
    assert [is_no_answer(t, r)
            for t in ("N/A", "n/a.", " None ", "No answer", "NOT MENTIONED", "", "no", "effusion")] == \
        [True, True, True, True, True, True, False, False]
    assert map_no_answer("N/A", r) == "" and map_no_answer(" right lower lobe ", r) == "right lower lobe"
    assert verbalize("radqa", "", r) == "N/A"
    assert verbalize("radqa", "", r, r.template("not-mentioned")) == "not mentioned"
    assert [verbalize("mednli", l) for l in MEDNLI_LABELS] == list(MEDNLI_LABELS)
    assert verbalize("clip", False) == "No"
    assert verbalize("clip", ["Imaging-related followup", "Appointment-related followup"]) == \
        "Appointment-related followup, Imaging-related followup"
    assert verbalize("clip", []) == "none"
    with pytest.raises(UserError):
        verbalize("mednli", "maybe")


# ---- prompt building -------------------------------------------------------------------------------------------

def _check_built(task, tpl, exs, q, count, budget, room, protected):
    ("Either a prompt that fits and keeps instruction + protected fields, or a UserError only when those alone "
     "don't fit.")
    long = "premise" if task == "mednli" else "context"
    minimal = tpl.separator.join([tpl.instruction, tpl.query.format(**{**q, long: " ..."})])
    try:
        b = build_prompt(tpl, exs, q, count, budget, room, task=task, item_id="item-7")
    except UserError as e:
        assert count(minimal) > budget - room and "item-7" in str(e)
        return None
    assert b.n_tokens == count(b.text) <= budget - room
    assert b.text.startswith(tpl.instruction + tpl.separator)
    for f in protected:
        assert q[f] in b.text
    # the query's format around its long field is intact, and the query ends the prompt
    pre, post = (part.format(**q) for part in tpl.query.split("{%s}" % long))
    assert pre in b.text and b.text.endswith(post)
    assert 0 <= b.n_exemplars <= len(exs)
    assert b.truncated["exemplars_dropped"] == len(exs) - b.n_exemplars
    for e in exs[:b.n_exemplars]:
        assert e["answer"] in b.text
    if b.truncated["query_words_cut"]:
        assert b.n_exemplars == 0                       # the query is cut only after every exemplar is gone
    if not any(b.truncated.values()):
        assert b.text == tpl.separator.join([tpl.instruction] + [tpl.example.format(**e) for e in exs]
                                            + [tpl.query.format(**q)])
    return b


@pytest.mark.parametrize("count", [words, chars4])
def test_radqa_prompts_never_cut_question_any_budget(data, count):
    ps, rng = load_prompts("radqa"), random.Random(0)
    train, dev = data["radqa"].splits["train"], data["radqa"].splits["dev"]
    n_ok = n_cut_query = 0
    for i in range(120):
        tpl = ps.templates[i % len(ps.templates)]
        item = dev[i % len(dev)]
        exs = [record_fields(r, ps, tpl)
               for r in draw_exemplars(train, rng.choice([0, 1, 3, 5]), i, 0, exemplar_stratum("radqa"))]
        q = record_fields(item, ps, tpl, answer=False)
        b = _check_built("radqa", tpl, exs, q, count, rng.randint(45, 900), rng.randint(1, 40), ["question"])
        if b is None:
            continue
        n_ok += 1
        if b.truncated["query_words_cut"]:
            n_cut_query += 1
            # the head of the report is kept, in order
            kept = b.text.rsplit(tpl.query.split("{context}")[0].format(**q), 1)[-1].split()
            n = len(item.context.split()) - b.truncated["query_words_cut"]
            assert kept[:n] == item.context.split()[:n] and kept[n] == "..."
    assert n_ok > 60 and n_cut_query > 0


def test_mednli_hypothesis_and_instruction_survive(data):
    ps, rng = load_prompts("mednli"), random.Random(1)
    train, dev = data["mednli"].splits["train"], data["mednli"].splits["dev"]
    for i in range(150):
        tpl = ps.templates[i % len(ps.templates)]
        # long premises force shortening
        exs = [{**record_fields(r, ps, tpl), "premise": r.premise + " word" * rng.randint(0, 80)}
               for r in draw_exemplars(train, 5, i, 0, exemplar_stratum("mednli"))]
        item = dev[i % len(dev)]
        q = {**record_fields(item, ps, tpl, answer=False), "premise": item.premise + " x" * rng.randint(0, 60)}
        _check_built("mednli", tpl, exs, q, words, rng.randint(10, 500), rng.randint(1, 10), ["hypothesis"])


def test_shortening_order_hand_worked():
    tpl = load_prompts("mednli").paper_template()
    exs = [{"premise": "a " * 40, "hypothesis": "h1", "answer": "neutral"},
           {"premise": "b " * 10, "hypothesis": "h2", "answer": "entailment"}]
    q = {"premise": "c " * 30, "hypothesis": "is febrile"}
    # words: instruction 5; exemplar = "Premise:" + premise + "Hypothesis:" h "Answer:" a = 4 + premise;
    # query 5 + premise
    full = build_prompt(tpl, exs, q, words, 10_000, 10)
    assert full.n_tokens == words(full.text) == 5 + (5 + 40) + (5 + 10) + (5 + 30) == 100
    # room for 88: a common cap c on exemplar premises with 5 + (5 + c + 1) + 15 + 35 <= 88 -> c = 27:
    # only the longest is cut
    b = build_prompt(tpl, exs, q, words, 98, 10)
    assert b.truncated == {"exemplar_words_cut": 13, "exemplars_shortened": 1, "exemplars_dropped": 0,
                           "query_words_cut": 0}
    assert "a " * 26 + "a ...\nHypothesis: h1" in b.text and "Premise: " + "b " * 10 + "\nHypothesis: h2" in b.text
    assert "c " * 30 in b.text and b.n_tokens == 88
    # room for 77: both at the 16-word floor, 5 + 22 + 15 + 35 = 77; room for 76 is too little: the last exemplar
    # goes and the first gets its text back up to 5 + (5 + c + 1) + 35 <= 76 -> c = 30
    b = build_prompt(tpl, exs, q, words, 87, 10)
    assert (b.n_exemplars, b.truncated["exemplars_dropped"], b.truncated["exemplar_words_cut"]) == (2, 0, 40 - 16)
    b = build_prompt(tpl, exs, q, words, 86, 10)
    assert (b.n_exemplars, b.truncated["exemplars_dropped"], b.truncated["exemplar_words_cut"]) == (1, 1, 40 - 30)
    # room for 30, below 5 + 22 + 35 = 62 with one exemplar at the floor: no exemplar, the query premise keeps its head
    # 5 + (1 + p + 1) + 4 <= 30 -> p = 19 words of 30
    b = build_prompt(tpl, exs, q, words, 40, 10)
    assert (b.n_exemplars == 0 and b.truncated["query_words_cut"] == 11
            and b.text.endswith("Hypothesis: is febrile\nAnswer:"))
    assert "Premise: " + "c " * 18 + "c ...\nHypothesis" in b.text
    # instruction + "Premise: ..." + hypothesis line + "Answer:" = 11 words; room for 10 is an error naming the item
    assert words(build_prompt(tpl, exs, q, words, 21, 10).text) == 11
    with pytest.raises(UserError, match="item q9"):
        build_prompt(tpl, exs, q, words, 20, 10, item_id="q9")
    with pytest.raises(UserError, match="answer_room"):
        build_prompt(tpl, exs, q, words, 10, 10)


def test_clip_per_label_prompt(data):
    ps = load_prompts("clip")
    td = data["clip"]
    tpl = ps.paper_template()
    note = td.notes["dev"][0]
    s = note.sentences[1]
    left, centre, right = note.window(1, 64)
    q = record_fields(s, ps, tpl, answer=False, context=" ".join([left, centre, right]), label="Lab-related followup")
    exs = [record_fields(r, ps, tpl, label="Lab-related followup") for r in
           draw_exemplars(td.splits["train"], 3, 0, 0, exemplar_stratum("clip"))]
    assert all(e["answer"] in ("Yes", "No") for e in exs)
    b = build_prompt(tpl, exs, q, words, 120, 2, task="clip")
    assert ps.label_questions["Lab-related followup"] in b.text and s.text in b.text and b.n_tokens <= 118


# ---- exemplar draws ---------------------------------------------------------------------------------------------

def test_draws_reproducible_distinct_stratified(data):
    train = data["mednli"].splits["train"]
    strat = exemplar_stratum("mednli")
    a = exemplar_ids(draw_exemplars(train, 3, 0, 0, strat))
    assert a == exemplar_ids(draw_exemplars(train, 3, 0, 0, strat))
    assert a == exemplar_ids(draw_exemplars(random.Random(5).sample(train, len(train)), 3, 0, 0, strat))  # input order
    draws = [tuple(exemplar_ids(draw_exemplars(train, 3, d, 0, strat))) for d in range(3)]
    assert len(set(draws)) == 3
    assert exemplar_ids(draw_exemplars(train, 3, 0, 1, strat)) != a                                           # seed
    byid = {r.id: r for r in train}
    for d in range(5):
        assert (sorted(byid[i].label for i in exemplar_ids(draw_exemplars(train, 3, d, 0, strat)))
                == sorted(MEDNLI_LABELS))
        assert len(set(exemplar_ids(draw_exemplars(train, 5, d, 0, strat)))) == 5
        c = Counter(byid[i].label for i in exemplar_ids(draw_exemplars(train, 5, d, 0, strat)))
        assert sorted(c.values()) == [1, 2, 2]
    qa = data["radqa"].splits["train"]
    for d in range(3):
        assert sorted(r.answerable for r in draw_exemplars(qa, 2, d, 0, exemplar_stratum("radqa"))) == [False, True]
    cl = data["clip"].splits["train"]
    for d in range(3):
        assert sorted(bool(r.labels) for r in draw_exemplars(cl, 2, d, 0, exemplar_stratum("clip"))) == [False, True]
    assert draw_exemplars(train, 0, 0, 0, strat) == []
    with pytest.raises(UserError):
        draw_exemplars(train[:2], 3, 0, 0, strat)


def test_draws_exclude_evaluated_item(data):
    train = data["mednli"].splits["train"]
    strat = exemplar_stratum("mednli")
    for r in train:
        for k in (1, 3, 5):
            got = exemplar_ids(draw_exemplars(train, k, 0, 0, strat, exclude_id=r.id))
            assert r.id not in got and len(got) == k
    # excluding everything but three: the three remaining are exactly what is drawn
    assert sorted(exemplar_ids(draw_exemplars(train[:4], 3, 0, 0, strat, exclude_id=train[0].id))) == \
        sorted(r.id for r in train[1:4])


_CHILD = """
import json, sys
from clinical_repro.data import load_task
from clinical_repro.prompts import draw_exemplars, exemplar_ids, exemplar_stratum, dev_sample
td = load_task(sys.argv[1], "mednli")
print(json.dumps([exemplar_ids(draw_exemplars(td.splits["train"], 3, 2, 7, exemplar_stratum("mednli"))),
                  dev_sample(td.splits["dev"], n=10, seed=3)]))
"""


def test_draws_and_dev_sample_same_across_processes(tiny_release, data):
    d, _ = tiny_release
    outs = []
    for hs in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hs}
        outs.append(json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(d)], env=env, check=True,
                                              capture_output=True, text=True, cwd=ROOT).stdout))
    td = data["mednli"]
    here = [exemplar_ids(draw_exemplars(td.splits["train"], 3, 2, 7, exemplar_stratum("mednli"))),
            dev_sample(td.splits["dev"], n=10, seed=3)]
    assert outs[0] == outs[1] == here


def test_dev_sample_fixed(data):
    dev = data["mednli"].splits["dev"]
    ids = {r.id for r in dev}
    s = dev_sample(dev, n=10)
    assert len(s) == len(set(s)) == 10 and set(s) <= ids
    assert s == dev_sample(list(reversed(dev)), n=10) == dev_sample([r.id for r in dev], n=10)
    assert s != dev_sample(dev, n=10, seed=1)
    assert dev_sample(dev, n=200) == sorted(ids)       # fewer than 200 dev items: all of them


# ---- choosing the wording -----------------------------------------------------------------------------------

def test_choose_template_ties():
    ps = load_prompts("mednli")
    ids = [t.id for t in ps.templates]
    assert ids[0] == "paper"
    r = choose_template({ids[0]: 0.70, ids[1]: 0.72, ids[2]: 0.71}, ps)
    assert (r["template"], r["reason"]) == (ids[1], "best") and r["scores"][ids[2]] == 0.71
    assert choose_template({ids[3]: 0.5, ids[0]: 0.5, ids[1]: 0.5}, ps)["template"] == "paper"
    assert choose_template({ids[3]: 0.5, ids[2]: 0.5, ids[0]: 0.1}, ps)["template"] == ids[2]
    with pytest.raises(UserError, match="unknown"):
        choose_template({"nope": 1.0}, ps)
    with pytest.raises(UserError, match="NaN"):
        choose_template({ids[0]: float("nan")}, ps)


def test_clip_dev_sample_has_positives_of_every_label(tiny_release):
    "Issue 11 item 8: the CLIP template is chosen on a dev sample where every label with dev positives has some."
    from clinical_repro.prompts import dev_sample_per_label
    dev = load_task(tiny_release[0], "clip").splits["dev"]
    by_id = {x.id: x for x in dev}
    labelled = {label for x in dev for label in x.labels}
    n = len(labelled) + 1
    uniform = dev_sample(dev, n=n)
    ids = dev_sample_per_label(dev, CLIP_LABELS, n=n)
    assert len(ids) == len(set(ids)) == n and ids == sorted(ids)
    assert {label for i in ids for label in by_id[i].labels} == labelled
    assert {label for i in uniform for label in by_id[i].labels} < labelled   # what a uniform draw of n misses
    assert ids == dev_sample_per_label(list(reversed(dev)), CLIP_LABELS, n=n)   # order-free, seeded
    assert ids != dev_sample_per_label(dev, CLIP_LABELS, n=n, seed=1)
    assert dev_sample_per_label(dev, CLIP_LABELS, n=len(dev) + 5) == sorted(by_id)


# ---- a prompt in pieces (a decoder's chat turns) ---------------------------------------------------------------

@pytest.mark.parametrize("task", ["mednli", "radqa", "clip"])
def test_prompt_parts_are_the_text_in_pieces(data, task):
    "The pieces rebuild the text exactly (encoders and seq2seq read the text, unchanged); exemplars: (query, answer)."
    from clinical_repro.prompts import PromptParts
    ps = load_prompts(task)
    td = data[task]
    train, item = td.splits["train"], td.splits["test"][0]
    for tpl in ps.templates:
        label = CLIP_LABELS[0] if tpl.variant == "per_label" else None
        exemplars = draw_exemplars(train, 3, 0, 0, exemplar_stratum(task))
        shown = [record_fields(e, ps, tpl, answer=True, label=label) for e in exemplars]
        query = record_fields(item, ps, tpl, answer=False, label=label)
        for budget in (10_000, 400, 150):
            try:
                built = build_prompt(tpl, shown, query, words, budget, 5, task=task)
            except UserError:
                continue
            parts = built.parts
            assert isinstance(parts, PromptParts) and len(parts.exemplars) == built.n_exemplars
            assert parts.instruction == tpl.instruction and built.text.endswith(parts.query)
            examples = [q + tpl.example[len(tpl.query):].replace("{answer}", a) for q, a in parts.exemplars]
            assert built.text == tpl.separator.join([tpl.instruction, *examples, parts.query])
            assert [a for _, a in parts.exemplars] == [fields["answer"] for fields in shown[:built.n_exemplars]]


def test_prompt_parts_fit_the_budget_as_counted_turns():
    "With `count_parts` (a chat's tokens), the budget drops whole exemplars (a user and an assistant turn together)."
    tpl = load_prompts("mednli").paper_template()
    exs = [{"premise": f"p{i} " * 5, "hypothesis": f"h{i}", "answer": "neutral"} for i in range(3)]
    q = {"premise": "the patient", "hypothesis": "is febrile"}
    def turns(parts):   # 10 tokens of chat frame, 4 per turn, plus the words
        texts = [parts.instruction, *(t for pair in parts.exemplars for t in pair), parts.query]
        return 10 + sum(4 + words(t) for t in texts)
    full = build_prompt(tpl, exs, q, words, 10_000, 5, count_parts=turns)
    assert full.n_tokens == turns(full.parts) == 10 + (4 + 5) + 3 * (4 + 9 + 4 + 1) + (4 + 7) == 84
    assert full.n_exemplars == 3 and words(full.text) < full.n_tokens   # counted as turns, not as the text
    # 84 - 18 = 66 tokens fit two exemplars, not three: the third exemplar's two turns go, the others are whole
    dropped = build_prompt(tpl, exs, q, words, 66 + 5, 5, count_parts=turns, min_exemplar_words=5)
    assert (dropped.n_exemplars, dropped.n_tokens, dropped.truncated["exemplars_dropped"]) == (2, 66, 1)
    assert dropped.parts.exemplars == full.parts.exemplars[:2]


def test_fixed_templates_by_variant():
    from clinical_repro.prompts import fixed_templates
    assert fixed_templates(load_prompts("mednli"), "paper") == {None: "paper"}
    assert fixed_templates(load_prompts("clip"), ["list-labels", "paper-yes-no"]) == {"list": "list-labels",
                                                                                    "per_label": "paper-yes-no"}
    with pytest.raises(UserError, match="no prompt template 'papr' for radqa; expected one of paper"):
        fixed_templates(load_prompts("radqa"), "papr")
    with pytest.raises(UserError, match="one per variant"):
        fixed_templates(load_prompts("clip"), ["paper-yes-no", "short-yes-no"])
