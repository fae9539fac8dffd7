"""Fuzzing lenetlab's readers of outside input: valid seed files, seeded mutations of them, and
the rule every outcome is held to.

Each Target makes its valid seed files once, then mutate(rng) returns one mutated input and
read(input) hands it to the real reader. judge() accepts a result or lenetlab's typed error
(LenetlabError) within TIME_LIMIT_S; anything else is a Failure. The pytest tests
(tests/test_fuzz.py) drive the mutations from Hypothesis; tests/fuzz_campaign.py runs many more.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lenetlab.errors import LenetlabError

TIME_LIMIT_S = 5.0
MEMORY_LIMIT_MIB = 512


class Failure(AssertionError):
    """An input that gave neither a result nor lenetlab's typed error, or took too long."""


def judge(read: Callable[[], object], label: str) -> str:
    """'accepted' or 'refused' (a typed error, or None); Failure naming label otherwise."""
    start = time.perf_counter()
    try:  # the readers of trial results and checkpoints say "damaged: run it again" with None
        outcome = "refused" if read() is None else "accepted"
    except LenetlabError:
        outcome = "refused"
    except Exception as exc:
        raise Failure(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    took = time.perf_counter() - start
    if took > TIME_LIMIT_S:
        raise Failure(f"{label}: took {took:.1f} s (limit {TIME_LIMIT_S} s)")
    return outcome


# ----------------------------------------------------------------------------- byte mutations

HUGE = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x80\x00\x00\x00",
        b"\x00\x01\x00\x00", b"\xff\xff", b"\x00"]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to four of: truncation, bit flips, a huge or zero count written over, a chunk
    inserted, removed or repeated."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("truncate", "flip", "flip", "count", "insert", "delete", "repeat"))
        where = rng.randrange(len(data) + 1) if rng.random() < 0.5 else rng.randrange(min(len(data), 64) + 1)
        if kind == "truncate":
            data = data[:where]
        elif kind == "flip" and data:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(min(len(data), 64))
                data[i] ^= 1 << rng.randrange(8)
        elif kind == "count":
            data[where:where + 4] = rng.choice(HUGE)
        elif kind == "insert":
            data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            del data[where:where + rng.randint(1, 64)]
        elif kind == "repeat":
            data[where:where] = data[where:where + rng.randint(1, 256)] * rng.randint(1, 8)
    return bytes(data)


# ----------------------------------------------------------------------------- tree mutations

ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -(2**64), 0.5, -0.0, 1e308, -1e-308,
              "", "x", "x" * 5000, "<b onmouseover=alert(1)>", "../../etc/passwd", "/etc/passwd",
              "a\nb", "\x1b[31m", "[l](javascript:alert(1))", "$x$", [], [1], [[[]]], {}, {"a": 1},
              [0.1] * 10, [[1] * 10] * 10]


def _paths(node, path=()) -> list[tuple]:
    """Every place in a JSON-like tree, as the keys and indexes that lead there."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def _parent(tree, path):
    for step in path[:-1]:
        tree = tree[step]
    return tree


def mutate_tree(tree, rng: random.Random, odd_values: list | None = None):
    """A deep copy of tree with one to three changes: a value replaced by one of another type or
    size, a key removed or added, a list emptied or its items repeated."""
    tree = copy.deepcopy(tree)
    odd = odd_values or ODD_VALUES
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(tree) if p]
        if not paths:
            return rng.choice(odd)
        path = rng.choice(paths)
        parent, last = _parent(tree, path), path[-1]
        kind = rng.choice(("replace", "replace", "replace", "remove", "add", "repeat"))
        if kind == "replace":
            parent[last] = copy.deepcopy(rng.choice(odd))
        elif kind == "remove":
            del parent[last]
        elif kind == "add" and isinstance(parent, dict):
            parent[rng.choice(["extra", "name", "seed", "epoch", "0", "-1"])] = copy.deepcopy(rng.choice(odd))
        elif kind == "repeat" and isinstance(parent[last], list):
            parent[last] = parent[last] * rng.choice((0, 2, 50))
    return tree


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One reader: its name, a mutation of its seed files into an input, and the read."""

    name: str
    mutate: Callable[[random.Random], object]
    read: Callable[[object], object]

    def run_one(self, rng: random.Random) -> str:
        value = self.mutate(rng)
        return judge(lambda: self.read(value), self.name)


def _restamp(path: Path, body: dict, kind: str) -> None:
    """Write body as lenetlab writes a record, checksum and all: what a forger can do."""
    from lenetlab import files

    files.write_record(path, kind, body)


def _write_idx(array: np.ndarray, kind: int) -> bytes:
    magic = 2051 if kind == 3 else 2049
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def idx_target(work: Path) -> Target:
    from lenetlab.data import read_idx

    rng0 = np.random.default_rng(0)
    seeds = {3: _write_idx(rng0.integers(0, 256, (20, 28, 28), dtype=np.uint8), 3),
             1: _write_idx(rng0.integers(0, 10, 20, dtype=np.uint8), 1)}
    path = work / "idx"

    def mutate(rng: random.Random):
        kind = rng.choice((1, 3))
        raw = seeds[kind]
        how = rng.choice(("raw", "gz-outside", "gz-inside"))
        if how == "raw":
            return kind, mutate_bytes(raw, rng)
        if how == "gz-inside":  # a valid gzip of a damaged file
            return kind, gzip.compress(mutate_bytes(raw, rng), mtime=0)
        return kind, mutate_bytes(gzip.compress(raw, mtime=0), rng)

    def read(value):
        kind, data = value
        path.write_bytes(data)
        return read_idx(path, kind, 20 if kind == 1 else None)

    return Target("idx", mutate, read)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or np.isfinite(value) else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    return '""'


def to_toml(spec: dict) -> str:
    """spec as TOML text, every table inline (None, which TOML lacks, left out); a mutation that
    left no table at all becomes the value of one key."""
    if not isinstance(spec, dict):
        spec = {"variant": spec}
    return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in spec.items() if v is not None)


SPEC_SEEDS = [
    {"name": "wd", "seeds": 2, "variant": "baseline",
     "grid": {"weight_decay": [0.0001, 0.001], "lr": [0.001]}},
    {"seeds": [0, 5], "configs": [{"variant": "dropout", "dropout_rate": 0.3, "name": "lighter"},
                                  {"variant": "tuned", "epochs": 5}], "reference": "lighter"},
    {"variant": "tuned", "grid": {"activation": ["relu", "tanh"], "pool": ["max"], "flip": [True, False],
                                  "schedule": ["cosine"], "translate": [0, 2], "erasing": [0.25]}},
]


def spec_target(work: Path, repo: Path) -> Target:
    from lenetlab.sweeps import load_spec

    texts = [to_toml(spec).encode() for spec in SPEC_SEEDS]
    texts += [p.read_bytes() for p in _examples(repo, search=False)]
    path = work / "spec.toml"

    def mutate(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return mutate_bytes(rng.choice(texts), rng)
        return to_toml(mutate_tree(rng.choice(SPEC_SEEDS), rng)).encode()

    def read(data: bytes):
        path.write_bytes(data)
        return load_spec(path)

    return Target("spec", mutate, read)


def _examples(repo: Path, search: bool) -> list[Path]:
    """The example specs: the searches (a [search] table), or the sweeps."""
    return [p for p in sorted((repo / "examples").glob("*.toml"))
            if (b"[search]" in p.read_bytes()) == search]


TUNE_SPEC_SEEDS = [
    {"name": "s", "variant": "baseline", "epochs": 3, "trials": 6, "pruner": "successive_halving",
     "confirm_seeds": 2, "search": {"lr": {"low": 1e-5, "high": 3e-2, "log": True}, "batch_size": [64, 128]}},
    {"variant": "tuned", "epochs": 20, "warmup_epochs": 5, "trials": 40, "timeout": 3600, "seed": 7,
     "min_epochs": 2, "trial_seed": 3, "confirm_seeds": [0, 1, 2], "pruner": "hyperband",
     "search": {"weight_decay": {"low": 1e-5, "high": 1e-2, "log": True}, "activation": ["relu", "tanh"],
                "flip": [True, False], "translate": {"low": 0, "high": 3}, "label_smoothing": [0.0, 0.1]}},
]


def tune_spec_target(work: Path, repo: Path) -> Target:
    from lenetlab.tunespec import load_tune_spec

    texts = [to_toml(spec).encode() for spec in TUNE_SPEC_SEEDS]
    texts += [p.read_bytes() for p in _examples(repo, search=True)]
    path = work / "search.toml"

    def mutate(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return mutate_bytes(rng.choice(texts), rng)
        return to_toml(mutate_tree(rng.choice(TUNE_SPEC_SEEDS), rng)).encode()

    def read(data: bytes):
        path.write_bytes(data)
        return load_tune_spec(path)

    return Target("tune spec", mutate, read)


def search_targets(work: Path, seed_search: Path) -> list[Target]:
    """A finished search's folder: its journal (Optuna's, bytes or forged lines), run.json and
    tune.json (forged with valid checksums), each read as resume, `runs` and `report` read it."""
    from lenetlab import files
    from lenetlab.markup import to_html
    from lenetlab.runs import describe
    from lenetlab.summary import load_summary
    from lenetlab.tunerecords import read_tune_plan, read_tune_summary
    from lenetlab.tuning.report import build_markdown
    from lenetlab.tuning.study import JOURNAL, open_study, repair

    run = work / "search"
    shutil.copytree(seed_search, run)
    kinds = {"run.json": "tune-plan", "tune.json": "tune-summary"}
    bodies = {name: files.read_record(run / name, kind) for name, kind in kinds.items()}
    originals = {name: (run / name).read_bytes() for name in (*kinds, JOURNAL)}
    lines = originals[JOURNAL].splitlines(keepends=True)
    spec = read_tune_plan(run).spec

    def fresh() -> Path:
        for name, data in originals.items():
            if (run / name).read_bytes() != data:
                (run / name).write_bytes(data)
        Path(run, f"{JOURNAL}.lock").unlink(missing_ok=True)
        return run

    def mutate_journal(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return mutate_bytes(originals[JOURNAL], rng)
        changed = list(lines)  # one line's JSON changed, as a forger writes it
        index = rng.randrange(len(changed))
        changed[index] = (json.dumps(mutate_tree(json.loads(changed[index]), rng)) + "\n").encode()
        return b"".join(changed)

    def read_journal(data: bytes):
        folder = fresh()
        (folder / JOURNAL).write_bytes(data)
        repair(folder)
        return len(open_study(folder, spec).trials)

    def record_mutation(name: str):
        def mutate(rng: random.Random):
            return mutate_tree(bodies[name], rng)
        return mutate

    def read_record(name: str):
        def read(body):
            folder = fresh()
            _restamp(folder / name, body, kinds[name])
            line = describe(folder).line()
            if name == "run.json":
                return read_tune_plan(folder), line
            return to_html(build_markdown(read_tune_summary(folder), load_summary(folder / "confirm"))), line
        return read

    return [Target("search journal", mutate_journal, read_journal),
            Target("tune run.json", record_mutation("run.json"), read_record("run.json")),
            Target("tune.json", record_mutation("tune.json"), read_record("tune.json"))]


def _odd_tensors():
    import torch

    return [torch.zeros(0), torch.zeros(3, 3), torch.tensor(float("nan")), torch.full((6,), float("inf")),
            torch.zeros(6, 1, 5, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
            torch.zeros(6, 1, 5, 5)[:, :, ::2], torch.zeros(10, 84).t(), 1, "x", None, [1, 2], {"a": 1}]


def weights_target(work: Path) -> Target:
    import torch

    from lenetlab.model import LeNet5V1, load_weights

    models = [LeNet5V1(), LeNet5V1(use_dropout=True),
              LeNet5V1(use_batch_norm=True, activation="relu", pool="max")]
    states = [m.state_dict() for m in models]
    sidecars = [{"architecture": {"activation": activation, "pool": pool, "use_dropout": dropout,
                                  "use_batch_norm": batch_norm}}
                for activation, pool, dropout, batch_norm in (("tanh", "avg", False, False),
                                                              ("tanh", "avg", True, False),
                                                              ("relu", "max", False, True))]
    saved = []
    for state in states:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())
    path = work / "weights.pth"

    def mutate(rng: random.Random):
        i = rng.randrange(len(states))
        sidecar = sidecars[i] if rng.random() < 0.7 else mutate_tree(sidecars[i], rng)
        how = rng.choice(("bytes", "bytes", "state", "sidecar"))
        if how == "bytes":
            return mutate_bytes(saved[i], rng), sidecar
        if how == "sidecar":
            return saved[i], mutate_tree(sidecars[i], rng)
        state = dict(states[i])
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(state))
            choice = rng.random()
            if choice < 0.6:
                state[key] = rng.choice(_odd_tensors())
            elif choice < 0.8:
                state[key + rng.choice(("", "x", ".0"))] = state.pop(key)
            else:
                del state[key]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue(), sidecar

    def read(value):
        data, sidecar = value
        path.write_bytes(data)
        path.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
        return load_weights(path)

    return Target("weights", mutate, read)


def image_target(work: Path) -> Target:
    from PIL import Image

    from lenetlab.prediction import load_image

    picture = Image.new("RGB", (40, 30), (250, 250, 250))
    picture.paste((20, 30, 200), (8, 5, 30, 25))
    seeds = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "RGB"),
                      ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGBA"), ("TIFF", "F")):
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, format=fmt)
        seeds.append((fmt.lower(), buffer.getvalue()))

    def mutate(rng: random.Random):
        fmt, data = rng.choice(seeds)
        return fmt, mutate_bytes(data, rng)

    def read(value):
        fmt, data = value
        path = work / f"picture.{fmt}"
        path.write_bytes(data)
        return load_image(path)

    return Target("image", mutate, read)


# ---- run folders: a real one (made by the real aggregation), then its files mutated and re-stamped


def run_folder_targets(work: Path, seed_run: Path) -> list[Target]:
    from lenetlab import files
    from lenetlab.markup import to_html
    from lenetlab.report import build_markdown
    from lenetlab.rundir import read_plan, read_result, result_path
    from lenetlab.runs import describe
    from lenetlab.summary import read_summary

    plan = read_plan(seed_run)
    trial = plan.trials()[0]
    bodies = {name: files.read_record(seed_run / name, kind) for name, kind in
              (("run.json", "run-plan"), ("summary.json", "summary"))}
    result_name = str(result_path(seed_run, trial).relative_to(seed_run))
    bodies[result_name] = files.read_record(seed_run / result_name, "trial")
    kinds = {"run.json": "run-plan", "summary.json": "summary", result_name: "trial"}
    metrics = (seed_run / "metrics.csv").read_text(encoding="utf-8")
    run = work / "run"
    shutil.copytree(seed_run, run)
    originals = {name: (run / name).read_bytes() for name in (*kinds, "metrics.csv")}

    def fresh() -> Path:
        """The run folder as made: each read changes only these files, so they are put back."""
        for name, data in originals.items():
            if (run / name).read_bytes() != data:
                (run / name).write_bytes(data)
        return run

    def record_mutation(name: str):
        def mutate(rng: random.Random):
            if rng.random() < 0.8:  # a forged file: mutated, then stamped with a valid checksum
                return "stamped", mutate_tree(bodies[name], rng)
            text = json.dumps({"format": 1, "file": kinds[name], **bodies[name]}).encode()
            return "bytes", mutate_bytes(text, rng)
        return mutate

    def write(name: str, value) -> Path:
        folder = fresh()
        how, content = value
        if how == "stamped" and isinstance(content, dict):
            _restamp(folder / name, content, kinds[name])
        elif how == "stamped":
            (folder / name).write_text(json.dumps(content), encoding="utf-8")
        else:
            (folder / name).write_bytes(content)
        return folder

    def read_run(value):
        folder = write("run.json", value)
        read_plan(folder)
        return describe(folder).line()

    def read_trial(value):
        folder = write(result_name, value)
        return read_result(folder, trial, plan.run_id)

    def report_of(folder: Path):
        summary, curves = read_summary(folder)
        text = build_markdown(summary, [])
        return to_html(text), describe(folder).line()

    def read_summary_file(value):
        return report_of(write("summary.json", value))

    def mutate_metrics(rng: random.Random) -> bytes:
        if rng.random() < 0.5:
            return mutate_bytes(metrics.encode(), rng)
        rows = [line.split(",") for line in metrics.splitlines()]
        for _ in range(rng.randint(1, 4)):
            row = rng.choice(rows)
            if row:
                row[rng.randrange(len(row))] = str(rng.choice(ODD_VALUES))
        return "\n".join(",".join(r) for r in rows).encode()

    def read_metrics(data: bytes):
        folder = fresh()
        (folder / "metrics.csv").write_bytes(data)
        body = dict(bodies["summary.json"])  # the forger also records the new file's digest
        digest = files.sha256_file(folder / "metrics.csv")
        body["files_sha256"] = {**body["files_sha256"], "metrics.csv": digest}
        _restamp(folder / "summary.json", body, "summary")
        return report_of(folder)

    return [Target("run.json", record_mutation("run.json"), read_run),
            Target("trial result", record_mutation(result_name), read_trial),
            Target("summary.json", record_mutation("summary.json"), read_summary_file),
            Target("metrics.csv", mutate_metrics, read_metrics)]


def checkpoint_target(work: Path, checkpoints: list[tuple[Path, object, int]]) -> Target:
    """checkpoints: (file, recipe, seed) of real checkpoints train_trial saved."""
    import torch

    from lenetlab.training import FileCheckpoint, _load_checkpoint

    seeds = [(path.read_bytes(), torch.load(path, weights_only=True), recipe, seed)
             for path, recipe, seed in checkpoints]
    for data, _, recipe, seed in seeds:  # the valid ones restore, or the fuzzing tests nothing
        (work / "valid.ckpt").write_bytes(data)
        assert _load_checkpoint(FileCheckpoint(work / "valid.ckpt"), recipe, seed) is not None
    path = work / "trial.ckpt"

    def mutate(rng: random.Random):
        data, state, recipe, seed = rng.choice(seeds)
        if rng.random() < 0.4:
            return mutate_bytes(data, rng), recipe, seed
        changed = mutate_tree(state, rng, ODD_VALUES + _odd_tensors())
        buffer = io.BytesIO()
        torch.save(changed, buffer)
        return buffer.getvalue(), recipe, seed

    def read(value):
        data, recipe, seed = value
        path.write_bytes(data)
        return _load_checkpoint(FileCheckpoint(path), recipe, seed)

    return Target("checkpoint", mutate, read)


def make_checkpoints(folder: Path, splits) -> list[tuple[Path, object, int]]:
    """Real checkpoints after epoch 1 of recipes that cover the optimisers, batch norm, the EMA
    and best_val: the seed files of the checkpoint target."""
    from lenetlab.recipes import RECIPES
    from lenetlab.training import train_trial

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, recipe in enumerate([replace(RECIPES["baseline"], epochs=2),
                                replace(RECIPES["tuned"], epochs=2, warmup_epochs=1, ema=0.9,
                                        checkpoint="best_val"),
                                replace(RECIPES["dropout"], epochs=2, optimizer="sgd")]):
        path = folder / f"{i}.ckpt"
        train_trial(recipe, 0, splits, checkpoint=path, stop_after_epoch=1, kernels="torch")
        made.append((path, recipe, 0))
    return made


def all_targets(work: Path, repo: Path, splits, data_dir: Path) -> list[Target]:
    """Every reader's target, its seed files made under work: a run folder by the real
    aggregation, checkpoints by real training on splits (the real data's), a search's folder by
    a real search on the real data in data_dir."""
    from .runs import STUDY, make_run
    from .searches import make_search

    seed_run = work / "seed-run"
    make_run(seed_run, STUDY)
    seed_search = make_search(work / "searches", "seed", data_dir, trials=4)
    return [idx_target(work), spec_target(work, repo), weights_target(work), image_target(work),
            *run_folder_targets(work, seed_run),
            checkpoint_target(work, make_checkpoints(work / "checkpoints", splits)),
            tune_spec_target(work, repo), *search_targets(work, seed_search)]
