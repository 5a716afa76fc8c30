"The cost model's token counts against the features training really builds, and the dry run's estimates."
import json

import numpy as np
import pytest

from clinical_repro import estimates, inputs, models, qa
from clinical_repro.data import load_task
from clinical_repro.tasks import family_spec


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.resolve_model("minilm-demo"))


@pytest.fixture(scope="module")
def data(tiny_release):
    return {task: load_task(tiny_release[0], task) for task in ("mednli", "radqa", "clip")}


def sequences(task, data, tokenizer, **settings):
    spec = family_spec(task, "encoder").model_copy(update=settings)
    count = estimates.token_counter(tokenizer)
    return estimates.task_sequences(task, "encoder", data[task].splits["train"], count, spec,
                                    data[task].notes.get("train"))


def test_mednli_tokens_equal_the_features(data, tokenizer):
    real = inputs.mednli_encoder_features(tokenizer, data["mednli"].splits["train"], max_length=24)["length"]
    estimated = sequences("mednli", data, tokenizer, max_length=24).source
    assert estimated.tolist() == real


@pytest.mark.parametrize("max_length,stride", [(64, 16), (128, 32), (512, 128)])
def test_radqa_windows_match_the_features(data, tokenizer, max_length, stride):
    records = data["radqa"].splits["train"]
    features = qa.qa_features(tokenizer, records, max_length=max_length, doc_stride=stride, train=True)
    real = sum(len(ids) for ids in features["input_ids"])
    estimated = sequences("radqa", data, tokenizer, max_length=max_length, doc_stride=stride).source.sum()
    assert abs(estimated - real)/real < 0.03, (estimated, real)


@pytest.mark.parametrize("window", [32, 256])
def test_clip_windows_match_the_features(data, tokenizer, window):
    real = inputs.clip_encoder_features(tokenizer, data["clip"].notes["train"], window_tokens=window)["length"]
    estimated = sequences("clip", data, tokenizer, window_tokens=window).source
    assert abs(estimated.sum() - sum(real))/sum(real) < 0.03, (estimated.sum(), sum(real))


def test_characters_give_the_right_order_of_magnitude(data, tokenizer):
    "Without a tokenizer, the table's chars_per_token keeps the token total within 25 % of the real count."
    table = estimates.load_cost_table()
    for task in ("mednli", "radqa", "clip"):
        spec = family_spec(task, "encoder")
        counted = estimates.task_sequences(task, "encoder", data[task].splits["train"],
                                           estimates.token_counter(tokenizer), spec, data[task].notes.get("train"))
        guessed = estimates.task_sequences(task, "encoder", data[task].splits["train"],
                                           estimates.token_counter(None, table.chars_per_token), spec,
                                           data[task].notes.get("train"))
        assert 0.75 < guessed.source.sum()/counted.source.sum() < 1.25, task


def test_colab_grid_dry_run_estimates_without_the_data(run_main, tmp_path, monkeypatch):
    "The acceptance command: per-unit estimates on a T4 and a total, on stand-ins of the releases (no data here)."
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main("run", "colab-t4", "--dry-run", "--gpu", "t4")
    assert rc == 1 and "preflight check(s) would fail" in err   # no releases, no hub models here
    units = [line for line in out.splitlines() if line.startswith("      seed ")]
    assert len(units) == 14 and all(" (~" in line for line in units)
    assert "estimated wall time on NVIDIA T4: " in out and "for 14 units" in out
    assert "mednli, radqa: the data is not here, estimated on a stand-in" in out
    rc, out, _ = run_main("run", "colab-t4", "--dry-run", "--gpu", "t4", "--json")
    planned = json.loads(out)
    total = planned["estimate"]["total_s"]
    notebooks = len({u["notebook"] for u in planned["units"]})
    overhead = estimates.load_cost_table().devices["t4"].overhead_s["notebook"]
    assert total == pytest.approx(sum(u["estimate"]["total_s"] for u in planned["units"]) + notebooks*overhead)
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").rglob("*.json"))


def test_units_longer_than_a_session_are_listed_once_per_notebook_with_the_longest():
    unit = lambda notebook, hours: {"notebook": notebook, "estimate": {"total_s": hours * 3600}}
    estimate = {"total_s": 60 * 3600, "session_s": 12 * 3600, "device": "NVIDIA H100", "to_run": 4, "jobs": 1,
                "measured": "unmeasured", "stand_ins": [],
                "over_session": [unit("clip/a__icl.ipynb", 13), unit("clip/a__icl.ipynb", 20),
                                 unit("clip/b__icl.ipynb", 14)]}
    lines = estimates.verdict_lines(estimate)
    assert lines[1] == "does not fit one free Colab session: about 5 sessions of 12 h, resuming between them"
    assert lines[2:] == ["  too long for any free session: clip/a__icl.ipynb, 2 unit(s), the longest 20.0 h",
                         "  too long for any free session: clip/b__icl.ipynb, 1 unit(s), the longest 14.0 h"]


def test_a_chat_decoder_choosing_on_dev_costs_both_layouts(data):
    "Every template is tried in both chat layouts on dev: twice the dev prompts of a plain-text decoder."
    table = estimates.load_cost_table()
    speed = estimates.Speed(table.devices["cpu"], "fp32", 1)
    splits = estimates.split_sequences("mednli", "decoder", data["mednli"], estimates.token_counter(None),
                                       family_spec("mednli", "decoder"))
    unit = {"task": "mednli", "family": "decoder", "shots": 1, "limit": 5}
    def eval_s(dev_n, layout, **extra):
        return estimates.icl_seconds({**unit, "dev_n": dev_n, **extra}, 135, splits, speed, table,
                                     layout=layout)["eval_s"]
    assert eval_s(4, None) == pytest.approx(eval_s(8, "text"))   # 4 items x 2 layouts = 8 items x 1 layout
    assert eval_s(4, None) > eval_s(4, "text")
    assert eval_s(4, None, template="paper") == eval_s(4, "text", template="paper")   # fixed: no dev pass at all
