"""The task registry: the release's labels, the single unknown-task error, strict task files (file and key named),
the one 0-100 -> 0-1 conversion, the study's fractions and ICL defaults, and that the registry follows
$CLINICAL_REPRO_PARAMS and edits of its files."""
import math, shutil

import pytest

from clinical_repro.config import default_params_dir, task_layer
from clinical_repro.core import DataError, UserError, temporary_environ
from clinical_repro.tasks import (CLIP_LABELS, MEDNLI_LABELS, TASKS, answer_room, check_task, data_fractions,
                                  dev_metric, empty_target, family_spec, get_task, icl_dev_n, task_names,
                                  to_unit_scale)


@pytest.fixture
def params_copy(tmp_path):
    "A private copy of params/ to break, made current through $CLINICAL_REPRO_PARAMS."
    copy = tmp_path / "params"
    shutil.copytree(default_params_dir(), copy)
    with temporary_environ({"CLINICAL_REPRO_PARAMS": copy}):
        yield copy


def test_labels_are_the_releases():
    assert TASKS == task_names() == ("mednli", "radqa", "clip")
    assert MEDNLI_LABELS == ("entailment", "neutral", "contradiction")
    # CLIP's label names as released (without the I- prefix), in the order of the bit masks in per-item files
    assert CLIP_LABELS == ("Appointment-related followup", "Medication-related followups", "Lab-related followup",
                           "Procedure-related followup", "Imaging-related followup",
                           "Case-specific instructions for patient", "Other helpful contextual information")
    assert get_task("radqa").labels == ()
    assert get_task("mednli").physionet_page == "https://physionet.org/content/mednli/1.0.0/"


@pytest.mark.parametrize("call", [get_task, check_task, dev_metric, empty_target, lambda t: to_unit_scale(t, "f1", 1),
                                  lambda t: family_spec(t, "encoder")])
def test_unknown_task_is_one_error(call):
    with pytest.raises(UserError, match=r"unknown task 'squad'; expected one of mednli, radqa, clip"):
        call("squad")


def test_dev_metrics_and_clusters():
    assert [dev_metric(t) for t in TASKS] == ["accuracy", "f1", "macro_f1"]
    assert [get_task(t).cluster.unit for t in TASKS] == ["premise", "report", "note"]
    assert [get_task(t).cluster.field for t in TASKS] == ["premise", "title", "doc_id"]


def test_to_unit_scale_converts_only_the_official_squad_keys():
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1"):
        assert to_unit_scale("radqa", key, 73.5) == 73.5 / 100
    for task, key in (("radqa", "best_f1_thresh"), ("radqa", "HasAns_total"), ("mednli", "accuracy"),
                      ("clip", "macro_f1"), ("clip", "f1")):
        assert to_unit_scale(task, key, 0.42) == 0.42
    assert math.isnan(to_unit_scale("radqa", "f1", float("nan")))
    assert {t: get_task(t).table_metrics() for t in TASKS} == {
        "mednli": {"accuracy": "MedNLI acc"}, "radqa": {"exact": "RadQA EM", "f1": "RadQA F1"},
        "clip": {"micro_f1": "CLIP micro-F1", "macro_f1": "CLIP macro-F1"}}


def test_study_defaults_and_icl_budgets():
    assert data_fractions() == (0.01, 0.05, 0.10, 0.25, 1.0)
    assert icl_dev_n() == 200
    assert answer_room() == {"mednli": 8, "radqa": 64, "clip:per_label": 4, "clip:list": 64}
    assert get_task("clip").icl.window_words == 256
    assert (empty_target("radqa"), empty_target("clip")) == ("no answer", "none")


def test_family_specs_match_the_layering():
    for task in TASKS:
        for family in ("encoder", "seq2seq", "decoder"):
            layer, _ = task_layer(task, family)
            layer.pop("_train")
            assert family_spec(task, family).model_dump() == {**family_spec(task, family).model_dump(), **layer}
    assert (family_spec("radqa", "encoder").max_length == 512
            and family_spec("radqa", "seq2seq").max_source_length == 1024)


def test_unknown_key_in_a_task_file_names_file_and_key(params_copy):
    file = params_copy / "tasks" / "clip.yaml"
    file.write_text(file.read_text().replace("physionet_page:", "physionet_url:"))
    with pytest.raises(DataError) as e:
        get_task("clip")
    assert f"{file}: physionet_url: unknown key" in str(e.value)
    with pytest.raises(DataError, match=r"clip.yaml: \(top\).physionet_url: unknown key"):
        task_layer("clip", "encoder")   # the layering names it too


def test_nested_unknown_key_and_bad_scale(params_copy):
    file = params_copy / "tasks" / "radqa.yaml"
    text = file.read_text()
    file.write_text(text.replace("HasAns_f1: {scale: 100}", "HasAns_f1: {scale: 10}"))
    with pytest.raises(DataError, match=r"radqa.yaml: metrics.HasAns_f1.scale: Input should be 1 or 100"):
        get_task("radqa")
    file.write_text(text.replace("answer_room: {default: 64}", "answer_room: {default: 64}\n  windw_words: 3"))
    with pytest.raises(DataError, match=r"radqa.yaml: icl.windw_words: unknown key"):
        get_task("radqa")


def test_registry_follows_the_params_folder_and_its_edits(params_copy):
    defaults = params_copy / "defaults.yaml"
    defaults.write_text(defaults.read_text().replace("dev_n: 200", "dev_n: 50"))
    assert icl_dev_n() == 50
    file = params_copy / "tasks" / "mednli.yaml"
    file.write_text(file.read_text().replace("title: MedNLI", "title: MedNLI (edited)"))
    assert get_task("mednli").title == "MedNLI (edited)"
    defaults.write_text(defaults.read_text().replace("dev_n: 50", "dev_n: 0.5"))
    with pytest.raises(DataError, match=r"defaults.yaml: icl.dev_n"):
        icl_dev_n()


def test_unknown_study_key(params_copy):
    defaults = params_copy / "defaults.yaml"
    defaults.write_text(defaults.read_text().replace("data_fractions:", "data_fraction:"))
    with pytest.raises(DataError, match=r"defaults.yaml: study.data_fraction: unknown key"):
        data_fractions()
