"""Distillation: the teacher's stored outputs are its models' on each image's own move, a run
trains its teacher once and reuses it, both steps train on its targets alike, and a teacher
file or field from someone else is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNELS, assert_one_line_error, run_cli

from lenetlab import cli, native, teaching
from lenetlab.augment import Augmentation, draw
from lenetlab.errors import SpecError
from lenetlab.model import LeNet5V1, fast_forward
from lenetlab.recipes import RECIPES, Recipe, scale_epochs, teacher_recipe, with_fields
from lenetlab.sweeps import config_name
from lenetlab.training import BACKGROUND, train_trial


def _models(count: int) -> list[LeNet5V1]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(LeNet5V1(use_batch_norm=True, activation="relu").eval())
    return models


def test_the_outputs_are_the_models_averaged_softmax_on_each_images_own_move(small_splits):
    """A batch's targets look up exactly what the models say of the image as the student's
    draws move it (translation and flip), averaged over the models, at the temperature."""
    x = small_splits.train_x[:300]
    models = _models(2)
    table = torch.from_numpy(teaching.ensemble_log_probs(models, x, 2, True, fast_forward))
    assert table.shape == (300, 50, 10)
    draws = draw(Augmentation(2, True), 300, torch.Generator().manual_seed(4), BACKGROUND)
    idx = torch.arange(40, 104)
    moved = draws.apply(x[idx], 40)
    assert len(set(draws.move[40:104].tolist())) > 20  # many different moves in the batch
    for weight, temp in ((1.0, 1.0), (0.6, 3.0)):
        outputs = teaching.Outputs(table, weight, temp)
        got = outputs.targets(idx, draws.move[40:104], small_splits.train_y[idx])
        with torch.no_grad():
            logp = (sum(m(moved).softmax(1) for m in models) / 2).log()
        want = (1 - weight) * F.one_hot(small_splits.train_y[idx], 10) + weight * (logp / temp).softmax(1)
        assert torch.allclose(got, want, atol=2e-6), (weight, temp, (got - want).abs().max())
        assert got.min() >= 0 and got.max() <= 1


def test_the_native_step_trains_on_the_teachers_targets_as_torch_does(small_splits):
    """An epoch of a distilling recipe (with translation, flips and mixup): the native step's
    history matches PyTorch's path to rounding (over more epochs the two drift apart as any
    two summation orders do; tests/support/parity.py compares single steps bit by bit)."""
    if native.load() is None:
        pytest.skip(native.unavailable_reason())
    logp = teaching.ensemble_log_probs(_models(2), small_splits.train_x, 2, True, fast_forward)
    table = torch.from_numpy(logp)
    recipe = replace(RECIPES["tuned"], epochs=1, schedule="constant", warmup_epochs=0, teacher="tuned",
                     distill=0.7, distill_temp=2.0, mixup=0.2)
    outs = {k: train_trial(recipe, 0, small_splits, kernels=k, teacher=teaching.Outputs(table, 0.7, 2.0))
            for k in ("native", "torch")}
    assert outs["native"].kernels == "native" and outs["torch"].kernels == "torch"
    for a, b in zip(outs["native"].history, outs["torch"].history, strict=True):
        assert (a.epoch, a.split) == (b.epoch, b.split)
        assert abs(a.loss - b.loss) < 2e-3 and abs(a.accuracy - b.accuracy) < 5e-3, (a, b)
    without = train_trial(replace(recipe, teacher="", distill=0.0), 0, small_splits, kernels="native")
    assert without.history[0].loss != outs["native"].history[0].loss  # the teacher changed the loss


def test_a_trial_with_a_teacher_needs_its_outputs(small_splits):
    recipe = with_fields(RECIPES["tuned"], {"teacher": "tuned", "distill": 0.5, "epochs": 1,
                                            "warmup_epochs": 0})
    with pytest.raises(ValueError, match="teacher's outputs are needed"):
        train_trial(recipe, 0, small_splits)
    with pytest.raises(teaching.TeacherError, match="does not reach"):
        teaching.outputs_for(recipe, None, small_splits)


def test_the_fields_are_checked_and_named():
    recipe = with_fields(RECIPES["tuned"], {"teacher": "tuned", "distill": 0.5, "distill_temp": 2.0})
    assert recipe.teacher_models == 3 and recipe.teacher_epochs == 0
    assert config_name({"variant": "tuned", "teacher": "tuned", "distill": 0.5}) == "tuned-tetuned-kd0.5"
    for changes, key in (({"distill": 0.5}, "distill"), ({"teacher": "tuned"}, "teacher"),
                         ({"teacher": "nonesuch", "distill": 0.5}, "teacher"),
                         ({"teacher": "tuned", "distill": 1.5}, "distill"),
                         ({"teacher": "tuned", "distill": 0.5, "teacher_models": 0}, "teacher_models"),
                         ({"teacher": "tuned", "distill": 0.5, "distill_temp": 0.0}, "distill_temp")):
        with pytest.raises(SpecError, match=key):
            with_fields(RECIPES["tuned"], changes, where="configs[0].")
    # epochs-scale scales the teacher's epochs too, its warm-up with them
    quick = scale_epochs(recipe, 0.1)
    assert quick.teacher_epochs == 10 and teacher_recipe(quick).epochs == 10
    assert teacher_recipe(quick).warmup_epochs == 3
    assert teacher_recipe(recipe) == RECIPES["tuned"]


def _spec(tmp_path, **fields):
    lines = ['name = "kd"', "seeds = 2", 'variant = "tuned"', "[[configs]]", 'name = "kd"',
             "epochs = 2", "warmup_epochs = 1", 'teacher = "tuned"', "teacher_models = 2",
             "teacher_epochs = 2", "distill = 0.5"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    spec = tmp_path / "kd.toml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def _sweep(spec, out, *more):
    return cli.main(["sweep", str(spec), "--out", str(out), "--train-subset", "1500", "--quiet",
                     "--kernels", KERNELS, *more])


def test_a_run_trains_its_teacher_once_and_resumes_without_retraining_it(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LENETLAB_DATA", str(data_dir))
    assert _sweep(_spec(tmp_path), tmp_path / "runs") == 0
    run = tmp_path / "runs" / "kd"
    folder = teaching.folder(run)
    members = sorted(folder.glob("models/seed*/*.pth"))
    assert [p.parent.name for p in members] == ["seed100000", "seed100001"]
    table = folder / "tuned-x2-ep2-tr2-flip.npy"
    assert np.load(table).shape == (1500, 50, 10)
    results = [json.loads((run / "trials" / f"kd__seed{s}.json").read_text()) for s in (0, 1)]
    assert all(r["status"] == "done" for r in results)
    # the members' accuracy is what a reader sees of the teacher; their models are never retrained
    stamps = {p: p.stat().st_mtime_ns for p in members}
    for s in (0, 1):
        (run / "trials" / f"kd__seed{s}.json").unlink()
    table.unlink()  # the outputs are computed again from the same models, to the same bits
    assert cli.main(["resume", str(run), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in members} == stamps
    again = [json.loads((run / "trials" / f"kd__seed{s}.json").read_text()) for s in (0, 1)]
    assert [r["test"] for r in again] == [r["test"] for r in results]


def test_damaged_outputs_fail_the_trial_in_one_line_naming_the_file(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LENETLAB_DATA", str(data_dir))
    run = tmp_path / "runs" / "kd"
    folder = teaching.folder(run)
    table = folder / "tuned-x2-ep2-tr2-flip.npy"
    outputs = teaching.Teacher(teacher_recipe(with_fields(RECIPES["tuned"], {
        "teacher": "tuned", "distill": 0.5, "teacher_models": 2, "teacher_epochs": 2})), 2)
    assert teaching.outputs_path(run, outputs, 2, True) == table
    assert _sweep(_spec(tmp_path), tmp_path / "runs") == 0
    data = bytearray(table.read_bytes())
    data[-3] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(teaching.TeacherError, match="digest differs"):
        teaching.load_outputs(table, 1500)
    teaching._loaded.clear()
    # a resume finds the table is not its stamp's and computes it again
    (run / "trials" / "kd__seed0.json").unlink()
    assert cli.main(["resume", str(run), "--quiet"]) == 0
    assert teaching.load_outputs(table, 1500).shape == (1500, 50, 10)


@pytest.mark.parametrize("field, value, words", [
    ("distill", 0.5, "needs a teacher"),
    ("teacher", "baseline", "teaches only with distill above 0"),
    ("distill_temp", -1, "distill_temp: invalid value"),
])
def test_a_bad_field_is_one_line_and_exit_2(field, value, words, tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("LENETLAB_DATA", str(data_dir))
    spec = tmp_path / "bad.toml"
    lines = ['name = "bad"', "seeds = 1", 'variant = "tuned"', "[[configs]]", 'name = "x"',
             f"{field} = {json.dumps(value)}"]
    if field == "distill_temp":
        lines += ['teacher = "tuned"', "distill = 0.5"]
    spec.write_text("\n".join(lines) + "\n")
    assert cli.main(["sweep", str(spec), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and field in err, err
    assert Recipe("x").teacher == ""


def test_train_refuses_a_recipe_with_a_teacher_in_one_line(capsys, data_dir):
    """One trained model keeps no run folder for a teacher: train says where to run it instead."""
    code = cli.main(["train", "tuned", "--teacher", "tuned", "--distill", "0.5", "--data-dir", str(data_dir)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learns from a teacher" in err and "lenetlab study" in err, err


def test_a_search_trains_its_teacher_once_without_the_test_set_and_confirms_on_test(tmp_path, data_dir):
    """`lenetlab tune` with a fixed teacher: its models train before the first trial, on the
    search's data (no test files), every trial learns from the one table, and the confirmation
    trains its own teacher beside its students."""
    from support.searches import make_search

    spec = {"variant": "tuned", "epochs": 2, "warmup_epochs": 1, "teacher": "tuned", "teacher_models": 2,
            "teacher_epochs": 2, "trials": 3, "pruner": "none", "confirm_seeds": 1,
            "search": {"distill": {"low": 0.3, "high": 0.9}, "distill_temp": [1.0, 3.0]}}
    run = make_search(tmp_path, "kd", data_dir, spec=spec, workers=2)
    members = [json.loads(p.read_text()) for p in sorted((teaching.folder(run) / "trials").glob("*.json"))]
    assert len(members) == 2 and all(m["status"] == "done" and m["test"] is None for m in members)
    trials = [json.loads(p.read_text()) for p in sorted((run / "trials").glob("trial*.json"))]
    assert len(trials) == 3 and all(t["status"] == "done" for t in trials)
    assert len({t["history"][0]["loss"] for t in trials}) == 3  # each its own distill and temperature
    assert (teaching.folder(run / "confirm") / "tuned-x2-ep2-tr2-flip.npy").is_file()
    assert json.loads((run / "confirm" / "summary.json").read_text())


@pytest.mark.parametrize("search, key", [({"teacher_models": [2, 3]}, "search.teacher_models"),
                                         ({"flip": [True, False]}, "search.flip")])
def test_a_search_keeps_its_teacher_fixed(tmp_path, search, key):
    spec = tmp_path / "s.toml"
    spec.write_text('variant = "tuned"\nteacher = "tuned"\ndistill = 0.5\n[search]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in search.items()))
    assert_one_line_error(run_cli("tune", spec, "--out", tmp_path), str(spec), key, "fixed in a search")
