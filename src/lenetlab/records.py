"""The records that cross modules and processes: run options, a trial, its epochs and its result.

Plain dataclasses: they pickle for the process pool and Ray alike, and turn into the JSON
lenetlab writes (to_dict) and back (from_dict) in one place, so a trial's key, its final
accuracies and the type of a seed have one definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .evaluation import Evaluation
from .recipes import Recipe, describe_start, recipe_from_dict

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RunOptions:
    """How trials run (not what they train): the same recipe and seed give the same numbers
    for the same options on the same kind of machine."""

    device: str = "cpu"
    threads: int = 1
    split_seed: int = 0
    train_subset: int | None = None  # train on the first N images of the split (quick checks)
    kernels: str = "auto"  # native, torch, or auto (native on CPU where it builds)


@dataclass(frozen=True)
class Trial:
    """One configuration trained from one seed."""

    config: str
    recipe: Recipe
    seed: int

    @property
    def key(self) -> str:
        return f"{self.config}__seed{self.seed}"


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    split: str  # train, val or test
    loss: float
    accuracy: float


def final_accuracies(history: list[EpochMetrics], epoch: int | None = None) -> dict[str, float]:
    """Accuracy per split at epoch (default: the last recorded one)."""
    epoch = epoch or max(row.epoch for row in history)
    return {row.split: row.accuracy for row in history if row.epoch == epoch}


class Diverged(Exception):
    """Training met a non-finite loss: the trial fails instead of saving a broken model."""

    def __init__(self, epoch: int, step: int | None) -> None:
        where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}"
        super().__init__(f"diverged at {where}: the loss is not a finite number "
                         f"(try a smaller learning rate)")


@dataclass(frozen=True)
class TrainedOn:
    """Where a trial was trained, as the process that trained it saw it: its host and CPU, and
    the build of the step (a native build's vector width, compiler and flags), which decide the
    rounding of its numbers. Recorded where the trial runs, not where its result is written."""

    host: str
    cpu: str
    kernels: str  # native or torch
    vector_bytes: int | None = None  # the native library's vector width (native.ln_vector_bytes)
    compiler: str | None = None  # the compiler that built the native library
    flags: str = ""  # its extra flags ($LENETLAB_NATIVE_CFLAGS_EXTRA), if any
    platform: str = ""
    cpu_count: int | None = None
    gpu: str | None = None
    # the target flag its build probed and took ("" none: the baseline vectors); None in results
    # written before lenetlab probed it, whose builds all took -march=native
    target: str | None = None

    @property
    def build(self) -> str:
        """The build that trained it, in words: trials of one build on one kind of CPU give
        the same numbers for the same seed."""
        if self.kernels != "native":
            return self.kernels
        target = "-march=native" if self.target is None else self.target or "no target flag"
        extra = f", {self.flags}" if self.flags else ""
        return f"native, {self.vector_bytes}-byte vectors, {self.compiler}, {target}{extra}"

    def machine(self, device: str) -> dict:
        """The sidecar's machine: provenance.machine_info's fields, as the trainer saw them."""
        info = {"host": self.host, "platform": self.platform, "cpu": self.cpu,
                "cpu_count": self.cpu_count, "device": device}
        if self.gpu:
            info["gpu"] = self.gpu
        return info


@dataclass(frozen=True)
class TrialResult:
    """A finished or failed trial, as recorded in trials/<key>.json."""

    trial: Trial
    run_id: str
    status: str  # done or failed
    error: str | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    test: Evaluation | None = None  # the kept model on the test set
    kept_epoch: int | None = None  # the epoch whose model was kept (the recipe's checkpoint choice)
    test_flip: float | None = None  # the kept model's test accuracy with flip averaging
    wall_time_s: float = 0.0
    options: RunOptions | None = None
    kernels: str | None = None  # which kernels trained it: native or torch
    weights: str | None = None  # relative to the run folder
    weights_sha256: str | None = None
    # The torch threads of each epoch its last process trained, in order: the last
    # len(epoch_threads) epochs of history (a resumed trial's earlier ones are not in it).
    epoch_threads: list[int] = field(default_factory=list)
    # Where its last process trained it (None in results written before lenetlab recorded it).
    trained_on: TrainedOn | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    def final(self, split: str) -> float:
        """The kept model's accuracy on split."""
        return final_accuracies(self.history, self.kept_epoch)[split]

    @property
    def start(self) -> str:
        return describe_start(self.trial.recipe)

    def with_weights(self, path: str, sha256: str) -> TrialResult:
        return replace(self, weights=path, weights_sha256=sha256)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["trial"]["key"] = self.trial.key
        return record

    @classmethod
    def from_dict(cls, record: dict) -> TrialResult:
        trial = record["trial"]
        test = record.get("test")
        options = record.get("options")
        return cls(
            trial=Trial(trial["config"], recipe_from_dict(trial["recipe"]), trial["seed"]),
            run_id=record["run_id"], status=record["status"], error=record.get("error"),
            history=[EpochMetrics(**row) for row in record.get("history", [])],
            test=Evaluation(**test) if test else None, kept_epoch=record.get("kept_epoch"),
            test_flip=record.get("test_flip"),
            wall_time_s=record.get("wall_time_s", 0.0),
            options=RunOptions(**options) if options else None, kernels=record.get("kernels"),
            weights=record.get("weights"), weights_sha256=record.get("weights_sha256"),
            epoch_threads=record.get("epoch_threads", []),
            trained_on=TrainedOn(**record["trained_on"]) if record.get("trained_on") else None,
        )
