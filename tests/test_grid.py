"""Grid files: every grid in params/ loads and expands; strict validation names the file and the key."""
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clinical_repro.core import DataError, UserError
from clinical_repro.grid import expand, grid_names, grid_path, load_grid, notebook_name, report_path, summary_counts
from clinical_repro.models import load_registry
from clinical_repro.tasks import data_fractions
from conftest import PARAMS


def write(tmp_path, obj, name="grid.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(obj, sort_keys=False))
    return p


def demo_obj() -> dict:
    return yaml.safe_load((PARAMS / "demo.yaml").read_text())


def error_of(path) -> str:
    with pytest.raises(UserError) as e:
        load_grid(path)
    return str(e.value)


@pytest.mark.parametrize("name", ["demo", "paper", "limited-data", "icl", "colab-t4"])
def test_every_grid_loads_and_expands(name):
    g = load_grid(PARAMS / f"{name}.yaml")
    exps = expand(g)
    assert g.grid == name and exps and all(e.units for e in exps)
    # one executed notebook per (task, model, mode): no two experiments share a report path
    assert len({report_path(e) for e in exps}) == len(exps)


def test_grid_files_are_all_listed():
    not_grids = {"defaults", "models", "paper_results", "synthetic", "throughput"}
    on_disk = {p.stem for p in PARAMS.glob("*.yaml")} - not_grids
    assert on_disk == set(grid_names())


def test_demo_counts_as_documented():
    # demo.yaml's header: 3 tasks x 2 models fine-tuned; mednli: minilm-demo 3 fractions x 2 seeds, the random one
    # 100 % x 2 seeds; radqa/clip 1 seed; icl: smollm2-demo x shots {0, 1, 3} (clip: {0}) -> 9 experiments, 19 units
    c = summary_counts(load_grid(PARAMS / "demo.yaml"))
    assert (c["experiments"], c["units"]) == (9, 19)
    assert (c["finetune_experiments"], c["finetune_units"]) == (6, (6 + 2) + 2 + 2)
    assert (c["icl_experiments"], c["icl_units"]) == (3, 3 + 3 + 1)


def test_paper_grids_counts():
    # models with a learning_rate_grid (params/models.yaml: 3 rates) run every rate: paper.yaml has 4 of them
    # (bioclinicalbert, gatortron, clinical-longformer, bert-base), limited-data.yaml 1 (gatortron), colab-t4 2
    assert summary_counts(load_grid(PARAMS / "paper.yaml"))["units"] == (10 + 4 * 3) * 3 * 3
    assert summary_counts(load_grid(PARAMS / "limited-data.yaml"))["units"] == (4 + 1 * 3) * 3 * 5 * 3
    # icl: per (task, model) 0 shots once + 3 shot counts x 3 draws
    assert summary_counts(load_grid(PARAMS / "icl.yaml"))["units"] == 6 * 3 * (1 + 3 * 3)
    assert summary_counts(load_grid(PARAMS / "colab-t4.yaml"))["units"] == (1 + 2 * 3) * 2


def test_paper_grid_models_and_data():
    g = load_grid(PARAMS / "paper.yaml")
    assert set(g.finetune.models) == {"t5-base", "clinical-t5-base", "roberta-large", "bioclinroberta", "gatortron",
                                      "t5-large", "clinical-t5-large", "pubmedgpt", "t5-3b",   # Table 3
                                      "bioclinicalbert", "clinical-longformer", "clinical-t5-base-ckpt", "scifive",
                                      "bert-base"}   # appendix, and ClinicalBERT's general counterpart
    assert g.finetune.seeds == [0, 1, 2] and g.finetune.fractions == [1.0] and g.data.needs_data_dir
    assert g.finetune.train == {} and g.finetune.task == {}
    lim = load_grid(PARAMS / "limited-data.yaml")
    assert lim.finetune.fractions == list(data_fractions())   # the paper's fractions
    tables_11_to_15 = {"pubmedgpt", "gatortron", "roberta-large", "bioclinroberta", "clinical-t5-large"}
    assert set(lim.finetune.models) == tables_11_to_15


def test_compare_pairs_differ_in_domain_only():
    "Each paired test of a shipped grid: clinical against general, same family and size (paper Table 1)."
    registry = load_registry()
    for name in ("paper", "limited-data", "colab-t4"):
        for clinical, general in load_grid(PARAMS / f"{name}.yaml").compare:
            a, b = registry[clinical], registry[general]
            assert (a.domain, b.domain) == ("clinical", "general"), (name, clinical, general)
            assert (a.family, a.size_m) == (b.family, b.size_m), (name, clinical, general)
    assert load_grid(PARAMS / "colab-t4.yaml").compare == [("bioclinicalbert", "bert-base")]
    pairs = set(load_grid(PARAMS / "paper.yaml").compare)
    assert {("bioclinroberta", "roberta-large"), ("gatortron", "roberta-large"), ("clinical-t5-base", "t5-base"),
            ("clinical-t5-large", "t5-large"), ("bioclinicalbert", "bert-base")} <= pairs


def test_demo_is_offline():
    g = load_grid(PARAMS / "demo.yaml")
    reg = load_registry()
    used = {e.model for e in expand(g)}
    assert used == {"minilm-demo", "minilm-random-demo", "smollm2-demo"}
    assert all(reg[m].builtin is not None and reg[m].hub_id is None for m in used)
    assert g.data.synthetic is not None and not g.data.needs_data_dir
    assert g.tasks == ["mednli", "radqa", "clip"] and not g.show_examples


def test_units_hand_worked(tmp_path):
    p = write(tmp_path, {"grid": "hand", "tasks": ["radqa", "mednli"],
                         "finetune": {"models": ["minilm-demo"], "seeds": [3, 1], "fractions": [1.0, 0.5],
                                      "train": {"epochs": 1}, "per_task": {"mednli": {"seeds": [7]}},
                                      "per_model": {"minilm-demo": {"train": {"epochs": 2},
                                                                    "task": {"radqa": {"doc_stride": 32}}}}},
                         "icl": {"models": ["t5-tiny-demo"], "shots": [2, 0], "draws": 2, "limit": 5,
                                 "per_task": {"mednli": {"shots": [1], "draws": 1}}}})
    exps = expand(load_grid(p))
    assert [(e.task, e.model, e.mode) for e in exps] == [
        ("radqa", "minilm-demo", "finetune"), ("radqa", "t5-tiny-demo", "icl"),
        ("mednli", "minilm-demo", "finetune"), ("mednli", "t5-tiny-demo", "icl")]
    assert [(u["fraction"], u["seed"]) for u in exps[0].units] == [(1.0, 3), (1.0, 1), (0.5, 3), (0.5, 1)]
    assert exps[0].train_overrides == {"epochs": 2}          # per_model wins over the section's train
    assert exps[0].task_overrides == {"doc_stride": 32}
    assert exps[0].overrides_source == str(p)
    assert [(u["shots"], u["draw"]) for u in exps[1].units] == [(2, 0), (2, 1), (0, 0)]
    assert all(u["limit"] == 5 and u["seed"] == 0 for u in exps[1].units)
    assert [(u["fraction"], u["seed"]) for u in exps[2].units] == [(1.0, 7), (0.5, 7)]
    assert [(u["shots"], u["draw"]) for u in exps[3].units] == [(1, 0)]
    assert notebook_name(exps[1]) == "t5-tiny-demo__icl.ipynb"
    assert report_path(exps[1], "out") == Path("out/hand/radqa/t5-tiny-demo__icl.ipynb")


def test_expansion_is_deterministic():
    a = expand(load_grid(PARAMS / "demo.yaml"))
    b = expand(load_grid(PARAMS / "demo.yaml"))
    assert a == b


@pytest.mark.parametrize("edit, key, words", [
    (lambda d: d.update(epochs=3), "epochs", "unknown key"),
    (lambda d: d["finetune"].update(seed=[0]), "finetune.seed", "unknown key"),
    (lambda d: d["data"]["synthetic"].update(sise="demo"), "data.synthetic.sise", "unknown key"),
    (lambda d: d["icl"].update(shot=[1]), "icl.shot", "unknown key"),
    (lambda d: d["finetune"]["per_task"]["mednli"].update(fraction=[1.0]), "finetune.per_task.mednli.fraction",
     "unknown key"),
    (lambda d: d.update(tasks=["mednli", "radqaa"]), "tasks", "unknown task 'radqaa'"),
    (lambda d: d["finetune"].update(models=["minilm-demo", "bert-tiny"]), "finetune.models",
     "unknown model 'bert-tiny'"),
    (lambda d: d["icl"].update(models=["t5-tiny"]), "icl.models", "unknown model 't5-tiny'"),
    (lambda d: d["icl"].update(models=["minilm-demo"]), "icl.models", "does not support in-context learning"),
    (lambda d: d["finetune"].update(models=["flan-t5-xxl"]), "finetune.models", "does not support fine-tuning"),
    (lambda d: d["finetune"]["train"].update(learnig_rate=1e-3), "finetune.train.learnig_rate", "unknown key"),
    (lambda d: d["finetune"]["task"]["clip"].update(window=64), "finetune.task.clip.window", "unknown key"),
    (lambda d: d["finetune"]["train"].update(epochs=-1), "finetune.train.epochs", "positive"),
    (lambda d: d["finetune"].update(per_model={"minilm-demo": {"train": {"lr": 1}}}),
     "finetune.per_model.minilm-demo.train.lr", "unknown key"),
    (lambda d: d["finetune"].update(fractions=[0.0, 1.0]), "finetune.fractions", "(0, 1]"),
    (lambda d: d["finetune"].update(seeds=[0, 0]), "finetune.seeds", "at most once"),
])
def test_errors_name_file_and_key(tmp_path, edit, key, words):
    d = demo_obj()
    edit(d)
    p = write(tmp_path, d, "broken.yaml")
    msg = error_of(p)
    assert f"{p}: {key}" in msg and words in msg, msg


def test_unknown_names_list_what_exists(tmp_path):
    d = demo_obj()
    d["finetune"]["models"] = ["minilm"]
    msg = error_of(write(tmp_path, d))
    assert "minilm-demo" in msg and "bioclinroberta" in msg          # the registry's names
    d = demo_obj()
    d["tasks"] = ["nli"]
    msg = error_of(write(tmp_path, d))
    assert all(t in msg for t in ("mednli", "radqa", "clip"))


# Hand-made grids with one mistake each: exactly the expected problems (the nearest name suggested), and no problem
# about the entries that are right (a per_task block of the misspelt task, a compare pair naming the misspelt model).
HAND_MADE = """
grid: hand
data: {synthetic: {size: tiny}}
tasks: [mednli, clip]
finetune:
  models: [minilm-demo, minilm-random-demo]
  seeds: [0]
  train: {epochs: 1}
  task: {clip: {window_tokens: 32}}
  per_task: {clip: {seeds: [1]}}
  per_model: {minilm-random-demo: {fractions: [1.0]}}
icl: {models: [smollm2-demo], shots: [0], per_task: {clip: {limit: 4}}}
compare: [[minilm-demo, minilm-random-demo]]
"""
MODELS = ("bert-base, bioclinicalbert, bioclinroberta, biomistral-7b, clinical-longformer, clinical-t5-base, "
          "clinical-t5-base-ckpt, clinical-t5-large, flan-t5-xxl, gatortron, gemma-3-27b-it, gemma-3-4b-it, "
          "llama-2-7b, llama-3-1-8b-instruct, llama-3-3-70b-instruct, medgemma-27b-text-it, medgemma-4b-it, "
          "meditron-7b, minilm-demo, minilm-random-demo, mistral-7b-instruct-v0-1, pubmedgpt, qwen2-5-7b-instruct, "
          "roberta-base, roberta-large, scifive, smollm2-demo, t5-3b, t5-base, t5-large, t5-tiny-demo")


@pytest.mark.parametrize("old, new, expected", [
    ("tasks: [mednli, clip]", "tasks: [mednli, clpi]",
     ["tasks: unknown task 'clpi' (did you mean 'clip'?); expected one of: mednli, radqa, clip"]),
    ("models: [minilm-demo, minilm-random-demo]", "models: [minilm-demo, minilm-random-dem]",
     [f"finetune.models: unknown model 'minilm-random-dem' (did you mean 'minilm-random-demo'?); "
      f"expected one of: {MODELS}"]),
    ("icl: {models: [smollm2-demo]", "icl: {models: [smollm-demo]",
     [f"icl.models: unknown model 'smollm-demo' (did you mean 'smollm2-demo'?); expected one of: {MODELS}"]),
    ("  seeds: [0]", "  sedes: [0]",   # a required key misspelt: not also "seeds: missing"
     ["finetune.sedes: unknown key (did you mean 'seeds'?); expected one of: models, seeds, fractions, train, task, "
      "per_task, per_model"]),
    ("tasks: [mednli, clip]", "taks: [mednli, clip]",
     ["taks: unknown key (did you mean 'tasks'?); expected one of: grid, description, data, tasks, show_examples, "
      "finetune, icl, compare"]),
    ("per_task: {clip: {seeds", "per_task: {clip: {sedes",
     ["finetune.per_task.clip.sedes: unknown key (did you mean 'seeds'?); expected one of: seeds, fractions, train"]),
    ("per_task: {clip: {seeds", "per_task: {clpi: {seeds",
     ["finetune.per_task.clpi: unknown task 'clpi' (did you mean 'clip'?); expected one of: mednli, radqa, clip"]),
    ("{size: tiny}", "{sise: tiny}",
     ["data.synthetic.sise: unknown key (did you mean 'size'?); expected one of: size, seed"]),
    ("train: {epochs: 1}", "train: {epoch: 1}",
     ["finetune.train.epoch: unknown key (did you mean 'epochs'?); expected one of early_stopping_patience, "
      "effective_batch, epochs, eval_batch, eval_steps, gradient_checkpointing, keep_checkpoints, learning_rate, "
      "learning_rate_grid, length_grouped, lr_scheduler, max_grad_norm, max_steps, optimizer, pad_to_multiple_of, "
      "per_device_batch, warmup_ratio, weight_decay"]),
    ("compare: [[minilm-demo, minilm-random-demo]]", "compare: [[minilm-demo, minilm-randm-demo]]",
     [f"compare[0]: unknown model 'minilm-randm-demo' (did you mean 'minilm-random-demo'?); "
      f"expected one of: {MODELS}"]),
])
def test_typos_suggest_the_nearest_name_and_nothing_else(tmp_path, old, new, expected):
    assert HAND_MADE.count(old) == 1
    path = tmp_path / "hand.yaml"
    path.write_text(HAND_MADE.replace(old, new))
    with pytest.raises(DataError) as e:
        load_grid(path)
    assert [str(p) for p in e.value.problems] == [f"{path}: {line}" for line in expected]


def test_hand_made_grid_is_valid_and_two_typos_are_both_reported(tmp_path):
    "The grid above loads; a misspelt task no longer hides a misspelt model in the finetune section."
    path = tmp_path / "hand.yaml"
    path.write_text(HAND_MADE)
    assert load_grid(path).tasks == ["mednli", "clip"]
    path.write_text(HAND_MADE.replace("[mednli, clip]", "[mednli, clpi]")
                    .replace("models: [minilm-demo, minilm-random-demo]", "models: [minilm-demo, minilm-randm-demo]"))
    with pytest.raises(DataError) as e:
        load_grid(path)
    assert [p.where for p in e.value.problems] == ["tasks", "finetune.models"]
    assert "did you mean 'clip'" in str(e.value) and "did you mean 'minilm-random-demo'" in str(e.value)


def test_an_entry_for_a_task_outside_the_grid_is_still_an_error(tmp_path):
    "Only what a misspelt name meant is spared: a per_task block for a task the grid never names is reported."
    path = tmp_path / "hand.yaml"
    path.write_text(HAND_MADE.replace("[mednli, clip]", "[mednli, clpi]").replace("{clip: {limit", "{radqa: {limit"))
    with pytest.raises(DataError) as e:
        load_grid(path)
    assert [str(p) for p in e.value.problems] == [
        f"{path}: tasks: unknown task 'clpi' (did you mean 'clip'?); expected one of: mednli, radqa, clip",
        f"{path}: icl.per_task.radqa: a task of this grid (mednli, clpi)"]


def test_overrides_for_tasks_outside_the_grid(tmp_path):
    d = demo_obj()
    d["tasks"] = ["mednli"]
    msg = error_of(write(tmp_path, d))
    assert "finetune.task.radqa" in msg and "finetune.per_task.radqa" in msg and "finetune.per_task.mednli" not in msg


def test_grid_path_by_name():
    assert grid_path("demo") == PARAMS / "demo.yaml"
    with pytest.raises(UserError, match="colab-t4"):
        grid_path("no-such-grid")


def test_icl_template_fixed_per_task(tmp_path, tiny_release):
    "per_task.<task>.template fixes the template (no dev choice): in every unit, in the run_id; unknown ids named."
    from clinical_repro.grid import icl_experiments
    from clinical_repro.identity import icl_identity
    obj = demo_obj()
    obj["icl"]["per_task"] = {"mednli": {"template": "paper"}, "clip": {"template": ["paper-yes-no", "list-labels"]}}
    grid = load_grid(write(tmp_path, obj))
    units = {task: icl_experiments(grid, task)[0].units for task in grid.tasks}
    assert {unit["template"] for unit in units["mednli"]} == {"paper"}
    assert all(unit["template"] == ["paper-yes-no", "list-labels"] for unit in units["clip"])
    assert all("template" not in unit for unit in units["radqa"])
    data, _ = tiny_release
    model = grid.icl.models[0]
    unit = dict(units["mednli"][0])
    fixed_id = icl_identity("mednli", model, data, **unit)[2]
    unit.pop("template")
    assert fixed_id != icl_identity("mednli", model, data, **unit)[2]
    obj["icl"]["per_task"]["mednli"]["template"] = "papr"
    path = write(tmp_path, obj, "typo.yaml")
    message = error_of(path)
    assert str(path) in message and "icl.per_task.mednli.template" in message and "'papr'" in message
    obj["icl"]["per_task"] = {"clip": {"template": ["paper-yes-no", "short-yes-no"]}}
    assert "icl.per_task.clip.template" in error_of(write(tmp_path, obj, "two.yaml"))


def test_per_model_fractions_and_seeds_replace_the_tasks(tmp_path):
    "A learning curve for one model only: per_model fractions (and seeds) win over per_task's and the section's."
    p = write(tmp_path, {"grid": "curve", "tasks": ["mednli", "clip"],
                         "finetune": {"models": ["minilm-demo", "minilm-random-demo"], "seeds": [0],
                                      "per_task": {"mednli": {"seeds": [0, 1], "fractions": [0.25, 1.0]}},
                                      "per_model": {"minilm-random-demo": {"fractions": [1.0]}}}})
    exps = {(e.task, e.model): e for e in expand(load_grid(p))}
    units = lambda task, model: [(u["fraction"], u["seed"]) for u in exps[task, model].units]
    assert units("mednli", "minilm-demo") == [(0.25, 0), (0.25, 1), (1.0, 0), (1.0, 1)]
    assert units("mednli", "minilm-random-demo") == [(1.0, 0), (1.0, 1)]
    assert units("clip", "minilm-random-demo") == [(1.0, 0)]
    p = write(tmp_path, {"grid": "bad", "tasks": ["mednli"],
                         "finetune": {"models": ["minilm-demo"], "seeds": [0],
                                      "per_model": {"minilm-demo": {"fractions": [0]}}}})
    assert "finetune.per_model.minilm-demo.fractions" in error_of(p)
