"""The records that cross modules and processes: run options, a trial, its epochs and its result.

Plain dataclasses: they pickle for the process pool and Ray alike, and turn into the JSON
lenetlab writes (to_dict) and back (from_dict) in one place, so a trial's key, its final
accuracies and the type of a seed have one definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .checked import checked, is_folder_name, is_inside, is_name, require
from .recipes import Recipe, describe_start, recipe_from_dict

if TYPE_CHECKING:  # for annotations only: a run folder's records are read without torch
    from .model import LeNet5V1


@dataclass
class Evaluation:
    """A model on one split: accuracy, loss, per-class accuracy and the confusion matrix."""

    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class

SPLITS = ("train", "val", "test")
TRAIN_SIZE, VAL_SIZE = 54_000, 6_000  # the training split and the validation split, of 60,000 images


@dataclass(frozen=True)
class RunOptions:
    """How trials run (not what they train): the same recipe and seed give the same numbers
    for the same options on the same kind of machine."""

    device: str = "cpu"
    threads: int = 1
    split_seed: int = 0
    train_subset: int | None = None  # train on the first N images of the split (quick checks)
    kernels: str = "auto"  # native, torch, or auto (native on CPU where it builds)

    def check(self) -> None:
        """ValueError for options no lenetlab run was made with (a run.json from someone else)."""
        require(1 <= self.threads <= 256, f"threads: {self.threads} is not 1 to 256")
        require(0 <= self.split_seed < 2**32, f"split_seed: {self.split_seed} is not 0 to 2**32-1")
        require(self.train_subset is None or 1 <= self.train_subset <= 54_000, "train_subset: not 1 to 54000")
        require(self.kernels in ("auto", "native", "torch"), f"kernels: {self.kernels!r} is unknown")


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


def _ten_classes(per_class: list, matrix: list) -> bool:
    """Whether a per-class accuracy and a confusion matrix are Fashion-MNIST's ten classes'."""
    return len(per_class) == len(matrix) == 10 and all(len(row) == 10 for row in matrix)


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
    status: str  # done, failed, or pruned (a search's trial its pruner stopped early)
    error: str | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    test: Evaluation | None = None  # the kept model on the test set (None in a search: no test split)
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
    # The wall time of each of those epochs, its steps and evaluations: what a trial costs beyond
    # them is the engine's (benchmarks/tune_overhead.py).
    epoch_seconds: list[float] = field(default_factory=list)
    # Where its last process trained it (None in results written before lenetlab recorded it).
    trained_on: TrainedOn | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def pruned(self) -> bool:
        return self.status == "pruned"

    @property
    def tested(self) -> bool:
        """Whether it was trained with the test split evaluated (not a search's trial)."""
        return any(row.split == "test" for row in self.history)

    def of_kind(self, search: bool) -> bool:
        """Whether it can be a trial of a search (search) or of a study or sweep: a search's are
        judged without the test split and may be pruned; a study's are tested, done or failed."""
        if self.status == "failed":
            return True
        return not self.tested if search else self.tested and not self.pruned

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
            epoch_threads=record.get("epoch_threads", []), epoch_seconds=record.get("epoch_seconds", []),
            trained_on=TrainedOn(**record["trained_on"]) if record.get("trained_on") else None,
        )._checked()

    def _checked(self) -> TrialResult:
        """self, once its fields have their types and fit together (TypeError, ValueError)."""
        checked(self, "trial result")
        require(is_name(self.trial.config) and 0 <= self.trial.seed < 2**32, "trial: bad config or seed")
        require(self.status in ("done", "failed", "pruned"),
                f"status: {self.status!r} is not done, failed or pruned")
        require(all(row.split in SPLITS and row.epoch >= 1 for row in self.history), "history: bad rows")
        splits = set(SPLITS) if self.tested else {"train", "val"}
        if self.done or self.pruned:
            require(set(final_accuracies(self.history, self.kept_epoch)) >= splits,
                    "history: no accuracy of every split at the kept epoch")
        if self.done:
            test = self.test
            require(test is None if not self.tested else
                    test is not None and _ten_classes(test.per_class_accuracy, test.confusion_matrix),
                    "test: not ten classes, or a test result without test rows")
            require(is_inside(self.weights), f"weights: {self.weights!r} is not a path inside the run folder")
        return self


# ----------------------------------------------------------------------------- the run's summary
# summary.json, typed: summary.py builds it from the trial results, the report, the plots, MLflow
# tracking, `lenetlab runs` and the Python API read it. to_dict writes the JSON lenetlab has
# always written (the same keys in the same order), from_dict reads it back, older files included.


def _by_seed(values: dict, kind=lambda v: v) -> dict:
    """JSON's string seed keys as ints (the other way in _seed_keys), values through kind."""
    return {int(seed): kind(value) for seed, value in values.items()}


def _seed_keys(values: dict) -> dict:
    return {str(seed): value for seed, value in values.items()}


@dataclass(frozen=True)
class Stat:
    """One accuracy over seeds: mean, sample std, 95% interval of the mean (stats.summarize),
    and each seed's value, in the order the seeds finished."""

    mean: float
    std: float
    ci95: list[float]
    n: int
    values: dict[int, float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "ci95": list(self.ci95), "n": self.n,
                "values": _seed_keys(self.values)}

    @classmethod
    def from_dict(cls, record: dict) -> Stat:
        return cls(record["mean"], record["std"], list(record["ci95"]), record["n"],
                   _by_seed(record["values"]))


@dataclass(frozen=True)
class Failure:
    seed: int
    error: str | None


@dataclass(frozen=True)
class ConfigSummary:
    """One configuration's results over its seeds (final: None when no seed completed)."""

    name: str
    variant: str
    recipe: Recipe
    seeds: list[int]
    completed_seeds: list[int]
    final: dict[str, Stat] | None  # by split: the kept models' accuracies
    best_seed: int | None
    per_class_test_accuracy: dict[int, list[float]]  # by seed
    confusion_matrix: dict[int, list[list[int]]]  # by seed: rows true class, columns predicted
    kernels: list[str]  # the kernels that trained its seeds
    builds: list[str]  # the builds that trained them, as each trainer saw it (TrainedOn.build)
    failed: list[Failure]
    kept_epochs: dict[int, int | None] | None = None  # by seed, once a seed completed
    test_flip: Stat | None = None  # flip-averaged test accuracy, for recipes that measure it

    @property
    def keeps_best_val(self) -> bool:
        return self.recipe.checkpoint == "best_val"

    def fits(self) -> None:
        """ValueError unless its seeds, statistics and matrices agree with each other."""
        where = f"configs: {self.name!r}"
        require(set(self.completed_seeds) <= set(self.seeds), f"{where}: completed seeds not planned")
        stats = [*(self.final or {}).values(), *([self.test_flip] if self.test_flip else [])]
        require(self.final is None or set(self.final) == set(SPLITS), f"{where}: final is not per split")
        for stat in stats:
            require(stat.n == len(stat.values) and len(stat.ci95) == 2
                    and set(stat.values) <= set(self.completed_seeds), f"{where}: statistics do not fit")
        require(self.best_seed is None or self.best_seed in self.completed_seeds, f"{where}: best seed")
        require(self.per_class_test_accuracy.keys() == self.confusion_matrix.keys()
                and all(_ten_classes(self.per_class_test_accuracy[seed], matrix)
                        for seed, matrix in self.confusion_matrix.items()),
                f"{where}: per-class accuracy or confusion matrix is not ten classes")

    def to_dict(self) -> dict:
        record = {"name": self.name, "variant": self.variant, "recipe": asdict(self.recipe),
                  "seeds": self.seeds, "completed_seeds": self.completed_seeds,
                  "final": ({split: stat.to_dict() for split, stat in self.final.items()}
                            if self.final is not None else None),
                  "best_seed": self.best_seed,
                  "per_class_test_accuracy": _seed_keys(self.per_class_test_accuracy),
                  "confusion_matrix": _seed_keys(self.confusion_matrix), "kernels": self.kernels,
                  "builds": self.builds, "failed": [asdict(f) for f in self.failed]}
        if self.kept_epochs is not None:
            record["kept_epochs"] = _seed_keys(self.kept_epochs)
        if self.test_flip is not None:
            record["test_flip"] = self.test_flip.to_dict()
        return record

    @classmethod
    def from_dict(cls, record: dict) -> ConfigSummary:
        final = record["final"]
        return cls(
            name=record["name"], variant=record["variant"], recipe=recipe_from_dict(record["recipe"]),
            seeds=record["seeds"], completed_seeds=record["completed_seeds"],
            final={split: Stat.from_dict(stat) for split, stat in final.items()} if final else None,
            best_seed=record["best_seed"],
            per_class_test_accuracy=_by_seed(record["per_class_test_accuracy"]),
            confusion_matrix=_by_seed(record["confusion_matrix"]),
            kernels=record.get("kernels", []), builds=record.get("builds", []),
            failed=[Failure(f["seed"], f["error"]) for f in record["failed"]],
            kept_epochs=_by_seed(record["kept_epochs"]) if "kept_epochs" in record else None,
            test_flip=Stat.from_dict(record["test_flip"]) if record.get("test_flip") else None)


@dataclass(frozen=True)
class Comparison:
    """A configuration against the reference, paired by seed, on final test accuracy
    (stats.paired_difference): mean_diff is configuration minus reference."""

    name: str
    reference: str
    seeds: list[int]
    mean_diff: float
    std: float
    ci95: list[float]
    n: int
    excludes_zero: bool


@dataclass(frozen=True)
class Best:
    name: str  # the configuration with the highest mean test accuracy
    seed: int  # its seed with the highest test accuracy


@dataclass(frozen=True)
class RunSettings:
    """How the run trained: its seeds, options, engine and workers (summary.json's "config")."""

    seeds: list[int]
    options: RunOptions
    engine: str
    workers: int

    def to_dict(self) -> dict:
        return {"seeds": self.seeds, **asdict(self.options), "engine": self.engine, "workers": self.workers}

    @classmethod
    def from_dict(cls, record: dict) -> RunSettings:
        options = {k: v for k, v in record.items() if k not in ("seeds", "engine", "workers")}
        return cls(record["seeds"], RunOptions(**options), record["engine"], record["workers"])


@dataclass(frozen=True)
class Summary:
    """A finished run's summary.json: per configuration, its results over seeds; the paired
    comparisons; provenance; and the SHA-256 of the files the results came with."""

    lenetlab_version: str
    kind: str  # study or sweep
    name: str
    created: str
    wall_time_s: float
    settings: RunSettings
    data_folder: str
    data_sha256: dict[str, str]
    versions: dict[str, str]
    machine: dict  # provenance.machine_info: host, platform, cpu, cpu_count, device (gpu)
    reference: str | None
    configs: list[ConfigSummary]
    comparisons: list[Comparison]
    best: Best | None
    files_sha256: dict[str, str]  # relative path: digest, checked before the results are trusted

    def config(self, name: str) -> ConfigSummary:
        for config in self.configs:
            if config.name == name:
                return config
        raise KeyError(f"{name!r}: no such configuration in {self.name} "
                       f"({', '.join(c.name for c in self.configs)})")

    @property
    def done_count(self) -> int:
        return sum(len(c.completed_seeds) for c in self.configs)

    @property
    def failed_count(self) -> int:
        return sum(len(c.failed) for c in self.configs)

    @property
    def best_config(self) -> ConfigSummary | None:
        return self.config(self.best.name) if self.best else None

    @property
    def best_test_accuracy(self) -> float | None:
        """The best single trial's test accuracy (the best configuration's best seed)."""
        return self.best_config.final["test"].values[self.best.seed] if self.best else None

    @property
    def kernels(self) -> list[str]:
        return sorted({k for c in self.configs for k in c.kernels})

    def to_dict(self) -> dict:
        return {
            "lenetlab_version": self.lenetlab_version, "kind": self.kind, "name": self.name,
            "created": self.created, "wall_time_s": self.wall_time_s, "config": self.settings.to_dict(),
            "data": {"folder": self.data_folder, "sha256": self.data_sha256},
            "versions": self.versions, "machine": self.machine, "reference": self.reference,
            "configs": [c.to_dict() for c in self.configs],
            "comparisons": [asdict(c) for c in self.comparisons],
            "best": asdict(self.best) if self.best else None, "files_sha256": self.files_sha256,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Summary:
        """summary.json's body as a Summary, checked: TypeError or ValueError naming what does not fit."""
        best = record["best"]
        return checked(cls(
            lenetlab_version=record["lenetlab_version"], kind=record["kind"], name=record["name"],
            created=record["created"], wall_time_s=record["wall_time_s"],
            settings=RunSettings.from_dict(record["config"]), data_folder=record["data"]["folder"],
            data_sha256=record["data"]["sha256"], versions=record["versions"], machine=record["machine"],
            reference=record["reference"], configs=[ConfigSummary.from_dict(c) for c in record["configs"]],
            comparisons=[Comparison(**c) for c in record["comparisons"]],
            best=Best(best["name"], best["seed"]) if best else None, files_sha256=record["files_sha256"]),
            "summary")._fits()

    def _fits(self) -> Summary:
        """self, once its parts agree: ValueError naming the first that does not."""
        names = [config.name for config in self.configs]
        require(self.kind in ("study", "sweep") and is_folder_name(self.name), "kind or name: not a run's")
        require(all(map(is_name, names)) and len(set(names)) == len(names),
                "configs: expected distinct names")
        for config in self.configs:
            config.fits()
        require(self.reference is None or self.reference in names, "reference: none of the configurations")
        for comparison in self.comparisons:
            require({comparison.name, comparison.reference} <= set(names) and len(comparison.ci95) == 2,
                    f"comparisons: {comparison.name!r} does not fit the configurations")
        if self.best is not None:
            config = next((c for c in self.configs if c.name == self.best.name), None)
            require(config is not None and config.final is not None
                    and self.best.seed in config.final["test"].values, "best: no such completed seed")
        require(all(map(is_inside, self.files_sha256)), "files_sha256: a path outside the run folder")
        return self


@dataclass(frozen=True)
class Trained:
    """What lenetlab.train returns: the kept model (in eval mode), its epochs, its test result."""

    model: LeNet5V1
    history: list[EpochMetrics]
    test: Evaluation  # the kept model on the 10,000 test images
    result: TrialResult  # the whole record, as a run folder's trials/<key>.json holds it
    weights: Path | None  # where its weights were saved (train's out), if anywhere

    def final(self, split: str) -> float:
        """The kept model's accuracy on split (train, val or test)."""
        return self.result.final(split)
