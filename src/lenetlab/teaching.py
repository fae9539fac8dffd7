"""Distillation's teacher: its models, trained once per run folder, and their outputs on each move.

A recipe with a teacher (recipes.py: teacher, teacher_models, teacher_epochs, distill,
distill_temp) learns from the averaged softmax of teacher_models models of the teacher
recipe, trained from seeds TEACHER_SEED, TEACHER_SEED + 1, ... on the run's own training
split and kept by that recipe's own rule (validation only, never the test set). They are
ordinary trials of the run folder's teacher/ subfolder, trained by the run's engine before
the students (prepare), so a killed run resumes them as it resumes the others, and every
student of the run shares them.

Translation and flips move whole pixels: a training image has only (2 translate + 1)^2 x
(2 if flip) versions. So the teacher's outputs on all of them are computed once, stored
beside its models (about 100 MB for tuned's 50 moves) and looked up per batch (Outputs):
no teacher forward while a student trains. Erasing and mixing are not discrete: an erased
image is taught its unerased version's outputs, and a mixed image the mix of its two
images' targets, as mixup and CutMix mix labels.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files, native
from .augment import _moves
from .data import FashionMNIST, Splits, make_splits
from .errors import LenetlabError, RunDirError
from .model import LeNet5V1, fast_forward
from .recipes import Recipe, architecture, teacher_recipe
from .records import RunOptions, Trial
from .rundir import read_result
from .training import BACKGROUND

TEACHER_SEED = 100_000  # the first teacher model's seed: far from any student's usual seeds
FORMAT = "teacher-outputs"  # the outputs file's stamp (files.write_record)


@dataclass(frozen=True)
class Teacher:
    """What teaches a recipe: models models, each trained with recipe."""

    recipe: Recipe
    models: int

    @property
    def name(self) -> str:
        return f"{self.recipe.name}-x{self.models}-ep{self.recipe.epochs}"

    def trials(self) -> list[Trial]:
        return [Trial(self.name, self.recipe, TEACHER_SEED + i) for i in range(self.models)]


def teacher_of(recipe: Recipe) -> Teacher | None:
    return Teacher(teacher_recipe(recipe), recipe.teacher_models) if recipe.teacher else None


def folder(run_dir: Path) -> Path:
    """Where a run folder keeps its teachers: a folder of trials like the run's own."""
    return Path(run_dir) / "teacher"


def outputs_path(run_dir: Path, teacher: Teacher, translate: int, flip: bool) -> Path:
    return folder(run_dir) / f"{teacher.name}-tr{translate}{'-flip' if flip else ''}.npy"


class TeacherError(LenetlabError):
    """A teacher model failed to train, or its outputs cannot be read: its students cannot train."""


# ---- the driver: train the teachers, then store their outputs ----

TrainTrials = Callable[[list[Trial], Path], None]  # runs trials into a folder with the run's engine


def prepare(run_dir: Path, recipes: Iterable[Recipe], run_id: str, options: RunOptions, data: FashionMNIST,
            train: TrainTrials, say: Callable[[str], None] | None = None) -> None:
    """Make sure every teacher of recipes has its models and their outputs in run_dir: the
    models not yet trained are trained (train), the outputs not yet stored computed here.
    data without test images: a search's run, whose teachers are trained without it too.
    say: told what is being done, in a line."""
    say = say or (lambda line: None)
    needs: dict[Teacher, set[tuple[int, bool]]] = {}
    for recipe in recipes:
        if (teacher := teacher_of(recipe)) is not None:
            needs.setdefault(teacher, set()).add((recipe.translate, recipe.flip))
    search = data.test_images is None
    where = folder(run_dir)
    splits = None
    for teacher, layouts in needs.items():
        (where / "checkpoints").mkdir(parents=True, exist_ok=True)
        todo = [t for t in teacher.trials() if not _done(read_result(where, t, run_id, search))]
        if todo:
            say(f"teacher {teacher.name}: training {len(todo)} of its {teacher.models} models before its "
                f"students (seeds {', '.join(str(t.seed) for t in todo)})")
            train(todo, where)
        results = [read_result(where, t, run_id, search) for t in teacher.trials()]
        failed = [t.seed for t, result in zip(teacher.trials(), results) if not _done(result)]
        if failed:
            raise TeacherError(f"{where}: teacher {teacher.name}'s models from seeds {failed} did not train "
                               "(their trial files say why); its students cannot train")
        # what the outputs are computed from: these models (their weights' digests) on the run's split
        stamp = {"teacher": teacher.name, "models": [r.weights_sha256 for r in results],
                 "split_seed": options.split_seed, "train_subset": options.train_subset}
        models = None
        for translate, flip in sorted(layouts):
            path = outputs_path(run_dir, teacher, translate, flip)
            if _stamp_problem(path, stamp) is None:
                continue
            if splits is None:
                splits = make_splits(data, options.split_seed, "cpu", options.train_subset)
            if models is None:
                models = [_load_model(where / r.weights, teacher.recipe) for r in results]
            say(f"teacher {teacher.name}: its outputs on every shift{' and flip' if flip else ''} of the "
                f"{len(splits.train_x):,} training images")
            forward = native.forward if native.native_gap(teacher.recipe) is None else fast_forward
            table = ensemble_log_probs(models, splits.train_x, translate, flip, forward)
            write_outputs(path, table, stamp)


def _done(result) -> bool:
    return result is not None and result.done


def _load_model(weights: Path, recipe: Recipe) -> LeNet5V1:
    model = LeNet5V1(dropout_rate=recipe.dropout_rate, **architecture(recipe))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


@torch.inference_mode()
def ensemble_log_probs(models: list[LeNet5V1], train_x: torch.Tensor, translate: int, flip: bool,
                       forward: Callable = fast_forward, chunk: int = 4096) -> np.ndarray:
    """(n, moves, 10) float32: log of the models' averaged softmax on every move of every
    training image, moves in augment._moves' order (the student's draws index them);
    forward(model, x) gives eval-mode logits."""
    table = _moves(translate, flip, torch.device("cpu"))
    n = len(train_x)
    out = np.empty((n, len(table), 10), dtype=np.float32)
    for start in range(0, n, chunk):
        x = train_x[start:start + chunk].reshape(-1, 28 * 28)
        flat = torch.cat([x, x.new_full((len(x), 1), BACKGROUND)], 1)
        for move, row in enumerate(table):
            images = flat[:, row].reshape(-1, 1, 28, 28).contiguous()
            probs = sum(forward(m, images).softmax(1) for m in models) / len(models)
            out[start:start + len(x), move] = probs.log().numpy()
    return out


def write_outputs(path: Path, table: np.ndarray, stamp: dict) -> None:
    """The table, then its stamp (with the table's digest and shape): atomically, each."""
    files.atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
    files.write_record(path.with_suffix(".json"), FORMAT,
                       {**stamp, "shape": list(table.shape), "table_sha256": files.sha256_file(path)})


def _stamp_problem(path: Path, stamp: dict) -> str | None:
    """None if path holds the outputs that stamp describes (the teacher's current models on
    the run's split)."""
    try:
        body = files.read_record(path.with_suffix(".json"), FORMAT)
    except Exception as exc:  # none yet, or damaged: compute them again
        return str(exc)
    if files.sha256_file(path) != body.get("table_sha256"):
        return "the table is not the one its stamp describes"
    if any(body.get(k) != v for k, v in stamp.items()):
        return "computed from other models or another split"
    return None


# ---- a worker: the stored outputs, and each batch's soft targets ----

_loaded: dict[Path, tuple[str, torch.Tensor]] = {}  # this process's tables, by path: (digest, table)


def load_outputs(path: Path, n: int) -> torch.Tensor:
    """The stored table at path as a (n, moves, 10) tensor, checked against its stamp (its
    digest and shape); kept for the next trial of this process."""
    try:
        body = files.read_record(path.with_suffix(".json"), FORMAT)
    except RunDirError as exc:
        raise TeacherError(str(exc)) from None
    if path in _loaded and _loaded[path][0] == body["table_sha256"]:
        return _loaded[path][1]
    data = path.read_bytes() if path.exists() else b""
    if hashlib.sha256(data).hexdigest() != body["table_sha256"]:
        raise TeacherError(f"{path}: not the teacher's outputs its stamp describes (digest differs)")
    table = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))  # the bytes just checked
    if list(table.shape) != body["shape"] or table.shape[0] != n or table.shape[2] != 10:
        raise TeacherError(f"{path}: shape {tuple(table.shape)}, not ({n}, moves, 10)")
    _loaded.clear()  # one table at a time: they are large
    _loaded[path] = (body["table_sha256"], table)
    return table


@dataclass
class Outputs:
    """A student's view of its teacher: soft targets for a batch."""

    table: torch.Tensor  # (n, moves, 10) log-probabilities
    weight: float  # distill: the teacher's share of each target
    temp: float  # distill_temp

    def targets(self, idx: torch.Tensor, move: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """(B, 10) float32: (1 - weight) onehot(y) + weight softmax(log p / temp) of each image's
        move (move: the batch's moves, None: the only one), clamped to [0, 1] against rounding."""
        logp = self.table[idx, move if move is not None else 0]
        probs = F.softmax(logp / self.temp, 1) if self.temp != 1.0 else logp.exp()
        target = torch.lerp(F.one_hot(y, 10).to(probs.dtype), probs, self.weight)
        return target.clamp_(0.0, 1.0)


def outputs_for(recipe: Recipe, run_dir: Path | None, splits: Splits) -> Outputs | None:
    """The outputs recipe's teacher stored in run_dir, for training recipe on splits (None
    without a teacher)."""
    teacher = teacher_of(recipe)
    if teacher is None:
        return None
    if run_dir is None:
        raise TeacherError(f"recipe {recipe.name!r}: its teacher's outputs live in the run folder, which "
                           "this worker does not reach")
    table = load_outputs(outputs_path(run_dir, teacher, recipe.translate, recipe.flip), len(splits.train_x))
    return Outputs(table.to(splits.train_x.device), recipe.distill, recipe.distill_temp)
