"""Benchmark lenetlab's five-variant study against the conventional training loop.

The conventional loop is what a user writes from the PyTorch tutorials, as the original
study did: a `Dataset` that turns each uint8 image into a normalised tensor one sample
at a time, a `DataLoader` (batch 64, shuffled) and per-batch metrics read back with
`.item()`. Both sides use the same recipes (batch size, epochs, Adam, learning rate,
weight decay), the same seeds, the same data and split, and do the same work per epoch:
train one epoch, then evaluate the validation and the test set.

    python benchmarks/benchmark.py                   # the whole study, one seed
    python benchmarks/benchmark.py --quick           # a shortened check (minutes)
    python benchmarks/benchmark.py --seeds 3 --json bench.json

Sections:
1. Per epoch: one epoch of the baseline recipe by the conventional loop (time spent
   waiting on the DataLoader vs the rest), by lenetlab's `train_trial` in this process
   with all threads, and with one thread.
2. Whole study: every (variant, seed) by the conventional loop, one after the other in
   this process with torch's default threads; then `lenetlab study` as a subprocess.
   Test accuracies, wall times, their ratio and peak memory (RSS) of both.
3. Arithmetic: the study's floating-point work (counted by torch's FlopCounterMode),
   this machine's float32 matmul peak (timed at the start, while idle), and the share
   of that peak each side sustained: how far a faster loop could still go here.

Progress goes to stderr; the report to stdout once everything has run. The work is done
in an order that keeps the memory figures honest: the conventional side runs first,
and its peak RSS is read before lenetlab's float tensors are made in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lenetlab.data import (
    MEAN,
    STD,
    TRAIN_SIZE,
    VAL_SIZE,
    FashionMNIST,
    load_fashion_mnist,
    make_splits,
)
from lenetlab.engines import usable_cores
from lenetlab.model import LeNet5V1
from lenetlab.provenance import cpu_model
from lenetlab.recipes import RECIPES, Recipe, scale_epochs
from lenetlab.training import train_trial

REPO_ROOT = Path(__file__).resolve().parents[1]
# The conventional evaluation loaders use large batches: faster for the conventional side
# (fewer collate calls and .item() syncs), and with 6,000 and 10,000 images every batch is
# full, so the mean of per-batch accuracies is the exact accuracy.
EVAL_BATCH = 1000
QUICK_VARIANTS = ("baseline", "batch_norm")
QUICK_EPOCHS_SCALE = 0.1
TARGET_SPEEDUP = 5.0
# With one seed per side there is no spread to measure; seed-to-seed std of the final test
# accuracy is typically 0.003-0.005, so a difference under this is within seed noise.
ONE_SEED_TOLERANCE = 0.01
# A 1-minute load average above this before we start means other work is running.
BUSY_LOAD = 0.5


def log(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The conventional loop
# ---------------------------------------------------------------------------


class FashionDataset(Dataset):
    """Tutorial style: each item is one uint8 image turned into a normalised float tensor.

    The same arithmetic as transforms.ToTensor() + Normalize((0.2860,), (0.3530,)), on a
    tensor instead of a PIL image (which would only make this side slower).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i].unsqueeze(0).float().div(255.0).sub(MEAN).div(STD)
        return image, int(self.labels[i])


def split_indices(split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The train / validation indices that lenetlab.data.make_splits uses: the same data."""
    order = torch.randperm(TRAIN_SIZE + VAL_SIZE,
                           generator=torch.Generator().manual_seed(split_seed))
    return order[:TRAIN_SIZE], order[TRAIN_SIZE:]


def conventional_loaders(data: FashionMNIST, batch_size: int,
                         workers: int) -> dict[str, DataLoader]:
    """The train (shuffled, recipe batch size) and val / test (EVAL_BATCH) DataLoaders."""
    train_idx, val_idx = split_indices()
    sets = {
        "train": FashionDataset(data.train_images[train_idx], data.train_labels[train_idx]),
        "val": FashionDataset(data.train_images[val_idx], data.train_labels[val_idx]),
        "test": FashionDataset(data.test_images, data.test_labels),
    }
    return {
        name: DataLoader(ds, batch_size=batch_size if name == "train" else EVAL_BATCH,
                         shuffle=name == "train", num_workers=workers)
        for name, ds in sets.items()
    }


def timed(loader: DataLoader, clock: dict[str, float]):
    """Yield the loader's batches, adding the time spent waiting for each to clock["wait"]."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        clock["wait"] += time.perf_counter() - start
        yield batch


def train_epoch(model: LeNet5V1, loader: DataLoader,
                optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One tutorial-style training epoch; also times the waits on the DataLoader."""
    model.train()
    loss_sum = acc_sum = 0.0
    batches = 0
    clock = {"wait": 0.0}
    start = time.perf_counter()
    for x, y in timed(loader, clock):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # Per-batch metrics read back to Python, as the original (torchmetrics Accuracy
        # per batch); the plain comparison here is cheaper than torchmetrics.
        loss_sum += loss.item()
        acc_sum += (logits.argmax(dim=1) == y).float().mean().item()
        batches += 1
    return {"loss": loss_sum / batches, "accuracy": acc_sum / batches,
            "seconds": time.perf_counter() - start, "data_wait_s": clock["wait"]}


def evaluate_loader(model: LeNet5V1, loader: DataLoader) -> dict[str, float]:
    """Tutorial-style evaluation: eval mode, no_grad, mean of per-batch metrics."""
    model.eval()
    loss_sum = acc_sum = 0.0
    batches = 0
    clock = {"wait": 0.0}
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in timed(loader, clock):
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y).item()
            acc_sum += (logits.argmax(dim=1) == y).float().mean().item()
            batches += 1
    return {"loss": loss_sum / batches, "accuracy": acc_sum / batches,
            "seconds": time.perf_counter() - start, "data_wait_s": clock["wait"]}


def conventional_trial(recipe: Recipe, seed: int, loaders: dict[str, DataLoader],
                       epochs: int) -> dict:
    """Train one (recipe, seed) for `epochs` epochs, evaluating val and test after each."""
    torch.manual_seed(seed)  # initial weights, then the DataLoader's shuffles and dropout
    model = LeNet5V1(recipe.use_dropout, recipe.use_batch_norm, recipe.dropout_rate)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr,
                                 weight_decay=recipe.weight_decay)
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        row = {"epoch": epoch, "train": train_epoch(model, loaders["train"], optimizer)}
        for split in ("val", "test"):
            row[split] = evaluate_loader(model, loaders[split])
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log(f"  conventional {recipe.name} seed {seed} epoch {epoch}/{epochs}: "
            f"train {row['train']['accuracy']:.4f} val {row['val']['accuracy']:.4f} "
            f"test {row['test']['accuracy']:.4f} ({row['seconds']:.1f} s)")
    return {"variant": recipe.name, "seed": seed, "epochs": epochs,
            "seconds": time.perf_counter() - start,
            "val_accuracy": history[-1]["val"]["accuracy"],
            "test_accuracy": history[-1]["test"]["accuracy"], "history": history}


# ---------------------------------------------------------------------------
# Section 1: one epoch
# ---------------------------------------------------------------------------


def time_conventional_epoch(loaders: dict[str, DataLoader]) -> dict:
    """One baseline epoch (train + val + test) of the conventional loop, broken down."""
    result = conventional_trial(RECIPES["baseline"], 0, loaders, epochs=1)["history"][0]
    train, val, test = result["train"], result["val"], result["test"]
    data_wait = train["data_wait_s"] + val["data_wait_s"] + test["data_wait_s"]
    return {
        "seconds": result["seconds"],
        "train_s": train["seconds"], "train_data_wait_s": train["data_wait_s"],
        "train_compute_s": train["seconds"] - train["data_wait_s"],
        "eval_s": val["seconds"] + test["seconds"],
        "eval_data_wait_s": val["data_wait_s"] + test["data_wait_s"],
        "data_wait_s": data_wait, "compute_s": result["seconds"] - data_wait,
        "threads": torch.get_num_threads(),
    }


def time_lenetlab_epoch(data: FashionMNIST, threads: int) -> dict:
    """One baseline epoch (train + val + test) by lenetlab's train_trial in this process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        splits = make_splits(data)
        train_idx, val_idx = split_indices()
        if not (torch.equal(splits.train_y, data.train_labels[train_idx])
                and torch.equal(splits.val_y, data.train_labels[val_idx])):
            raise RuntimeError("the conventional split differs from lenetlab's make_splits")
        start = time.perf_counter()
        output = train_trial(RECIPES["baseline"].with_changes(epochs=1), 0, splits)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    test = [r for r in output.history if r["split"] == "test"][-1]
    log(f"  lenetlab train_trial, {threads} thread(s): {seconds:.2f} s/epoch, "
        f"test {test['accuracy']:.4f}")
    return {"seconds": seconds, "threads": threads, "test_accuracy": test["accuracy"]}


# ---------------------------------------------------------------------------
# Section 2: the lenetlab study as a subprocess, with its memory
# ---------------------------------------------------------------------------


def _descendants(root: int) -> set[int]:
    """A process and all its current descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # the process ended meanwhile
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier += children
    return tree


def _proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in KiB; None when unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class TreeMemorySampler(threading.Thread):
    """Samples a process tree a few times a second: each process's peak RSS, and the tree's PSS.

    Why not getrusage(RUSAGE_CHILDREN).ru_maxrss: a child started from this process inherits
    this process's own peak RSS at exec time into its ru_maxrss (Linux records the old
    address space's high-water mark), and lenetlab's trial processes are forked by a
    forkserver that lenetlab never waits for, so their peaks would not reach us anyway.
    VmHWM in /proc/PID/status is each process's own high-water mark since its exec or fork.
    PSS (proportional set size) shares pages that forked processes have in common among
    them, so its sum over the tree is the memory the study really holds.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib: dict[int, int] = {}  # pid -> VmHWM, the last seen (it only grows)
        self.peak_total_pss_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        if not Path("/proc/self/status").exists():
            return  # not Linux
        while not self._stop_event.is_set():
            total = 0
            for pid in _descendants(self.pid):
                hwm = _proc_kib(f"/proc/{pid}/status", "VmHWM")
                if hwm is not None:
                    self.peak_kib[pid] = max(hwm, self.peak_kib.get(pid, 0))
                total += _proc_kib(f"/proc/{pid}/smaps_rollup", "Pss") or 0
            self.peak_total_pss_kib = max(self.peak_total_pss_kib, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def find_summary(run_dir: Path) -> Path | None:
    """RUN_DIR/summary.json, or the newest RUN_DIR/*/summary.json (when --out is a parent)."""
    if (run_dir / "summary.json").is_file():
        return run_dir / "summary.json"
    found = sorted(run_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def same_work_warnings(summary: dict, variants: list[str], seeds: int,
                       epochs_scale: float) -> list[str]:
    """Check from summary.json that lenetlab trained what the conventional side trained."""
    warnings = []
    options = summary.get("config", {})
    if options.get("train_subset"):
        warnings.append(f"lenetlab trained on a subset of {options['train_subset']} images")
    if options.get("split_seed", 0) != 0:
        warnings.append(f"lenetlab used split seed {options['split_seed']}, this script 0")
    for config in summary.get("configs", []):
        name, recipe = config.get("name"), config.get("recipe") or {}
        if name not in variants:
            continue
        expected = RECIPES[name].to_dict() | {"epochs": scale_epochs(RECIPES[name], epochs_scale).epochs}
        for key in ("epochs", "batch_size", "lr", "weight_decay", "optimizer",
                    "use_dropout", "use_batch_norm", "dropout_rate", "warm_start_from"):
            if key in recipe and recipe[key] != expected[key]:
                warnings.append(f"{name}: lenetlab {key} {recipe[key]!r}, "
                                f"conventional {expected[key]!r}")
        if "seeds" in config and list(config["seeds"]) != list(range(seeds)):
            warnings.append(f"{name}: lenetlab seeds {config['seeds']}, "
                            f"conventional {list(range(seeds))}")
    return warnings


def run_lenetlab_study(variants: list[str], seeds: int, epochs_scale: float, data_dir: Path,
                       workers: int | None, run_dir: Path) -> dict:
    """Run `lenetlab study` as a subprocess; its wall time, peak RSS and summary.json."""
    command = [sys.executable, "-m", "lenetlab", "study", "--out", str(run_dir),
               "--seeds", str(seeds), "--variants", ",".join(variants),
               "--epochs-scale", str(epochs_scale), "--data-dir", str(data_dir), "--quiet"]
    if workers is not None:
        command += ["--workers", str(workers)]
    log(f"lenetlab study: {' '.join(command)}")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    sampler = TreeMemorySampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - start
    sampler.stop()
    result = {"command": command, "returncode": process.returncode, "seconds": seconds,
              "processes_seen": len(sampler.peak_kib),
              "peak_rss_mib": max(sampler.peak_kib.values(), default=0) / 1024 or None,
              "peak_total_pss_mib": sampler.peak_total_pss_kib / 1024 or None}
    summary_path = find_summary(run_dir)
    if process.returncode != 0 or summary_path is None:
        tail = "\n".join(output.strip().splitlines()[-15:])
        result["error"] = (f"`lenetlab study` exited with status {process.returncode}"
                           + ("" if summary_path else f", no summary.json under {run_dir}")
                           + (f"; its last output:\n{tail}" if tail else ""))
        return result
    result["summary"] = str(summary_path)
    try:
        summary = json.loads(summary_path.read_text())
        result["test"] = {
            config["name"]: {"mean": float(config["final"]["test"]["mean"]),
                             "values": {str(k): float(v) for k, v
                                        in config["final"]["test"]["values"].items()}}
            for config in summary["configs"]
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        result["error"] = f"{summary_path}: unexpected layout ({type(exc).__name__}: {exc})"
        return result
    result["warnings"] = same_work_warnings(summary, variants, seeds, epochs_scale)
    return result


# ---------------------------------------------------------------------------
# Section 3: arithmetic and this machine's peak
# ---------------------------------------------------------------------------


def model_flops(batch: int = 64) -> dict[str, float]:
    """FLOPs per image of a training step (forward + backward) and of an evaluation.

    Counted by torch on the baseline model (batch norm and dropout add no matmul or
    convolution work): 2.26 MFLOP per training image, 0.83 MFLOP per evaluated one.
    """
    model = LeNet5V1()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(model(x), y).backward()
    with FlopCounterMode(display=False) as evaluation, torch.no_grad():
        model(x)
    return {"train_per_image": train.get_total_flops() / batch,
            "eval_per_image": evaluation.get_total_flops() / batch}


def matmul_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """The best float32 matmul rate of one thread: what one core can do at most."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm up
        best, deadline = math.inf, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size ** 3 / best / 1e9


def arithmetic(conventional: dict, lenetlab: dict, test_images: int, peak_per_core: float,
               cores: int) -> dict:
    """The study's GFLOP, the machine's peak, and the share of it each side sustained."""
    flops = model_flops()
    per_epoch = (TRAIN_SIZE * flops["train_per_image"]
                 + (VAL_SIZE + test_images) * flops["eval_per_image"]) / 1e9
    total = per_epoch * conventional["trial_epochs"]
    peak = peak_per_core * cores
    result = {"gflop_per_trial_epoch": per_epoch, "study_gflop": total,
              "matmul_peak_gflops_per_core": peak_per_core, "cores": cores,
              "seconds_at_peak": total / peak,
              "target_seconds": conventional["seconds"] / TARGET_SPEEDUP,
              "conventional_gflops": total / conventional["seconds"]}
    result["target_share_of_peak"] = result["seconds_at_peak"] / result["target_seconds"]
    if "seconds" in lenetlab:
        result["lenetlab_gflops"] = total / lenetlab["seconds"]
    return result


# ---------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------


def noise_verdict(conv: list[float], lab: list[float]) -> tuple[float, str]:
    """The tolerance for the difference of mean test accuracies, and how it was found."""
    if len(conv) >= 2 and len(lab) >= 2:
        se = math.sqrt(statistics.variance(conv) / len(conv) + statistics.variance(lab) / len(lab))
        return 2 * se, "2 x standard error of the difference (seed std of both sides)"
    return ONE_SEED_TOLERANCE, (f"one seed: typical seed std is 0.003-0.005, so differences "
                                f"under {ONE_SEED_TOLERANCE} are within seed noise")


def compare(conventional: list[dict], lenetlab: dict, variants: list[str]) -> list[dict]:
    """Per variant: mean test accuracy of both sides, difference, within noise or not."""
    rows = []
    for name in variants:
        trials = [t for t in conventional if t["variant"] == name]
        conv = [t["test_accuracy"] for t in trials]
        row = {"variant": name, "epochs": trials[0]["epochs"],
               "conventional_test_mean": statistics.fmean(conv),
               "conventional_test_values": {str(t["seed"]): t["test_accuracy"] for t in trials},
               "conventional_seconds": sum(t["seconds"] for t in trials)}
        lab = lenetlab.get("test", {}).get(name)
        if lab is not None:
            tolerance, rule = noise_verdict(conv, list(lab["values"].values()))
            row.update(lenetlab_test_mean=lab["mean"], lenetlab_test_values=lab["values"],
                       difference=lab["mean"] - row["conventional_test_mean"],
                       tolerance=tolerance, tolerance_rule=rule)
            row["within_noise"] = abs(row["difference"]) <= tolerance
        rows.append(row)
    return rows


def machine_info() -> dict:
    """CPU model, cores, torch and Python versions, torch's default thread count."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_average_at_start": _load_average()}


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes every timing here noisy."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def print_report(report: dict) -> None:
    """The human-readable report on stdout."""
    m = report["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} "
          f"(default threads {m['torch_threads']}); Python {m['python']}")
    load = m.get("load_average_at_start")
    if load is not None and load >= BUSY_LOAD:
        print(f"WARNING: load average {load:.2f} before the benchmark started: other processes "
              "are using the CPU, so the timings below are unreliable (oversubscribed torch "
              "threads slow down badly). Rerun on an idle machine.")
    cfg = report["config"]
    print(f"Study: variants {', '.join(cfg['variants'])}; seeds {cfg['seeds']}; "
          f"epochs scale {cfg['epochs_scale']}; conventional DataLoader workers "
          f"{cfg['loader_workers']}; data {cfg['data_dir']}")

    per_epoch = report.get("per_epoch")
    if per_epoch:
        c = per_epoch["conventional"]
        print("\n== One epoch of the baseline recipe (train 54,000 + evaluate 6,000 val "
              "and 10,000 test) ==")
        print(f"{'':38}{'s/epoch':>9}{'speed-up':>10}")
        print(f"{'conventional loop, ' + str(c['threads']) + ' threads':38}"
              f"{c['seconds']:9.2f}{1.0:9.1f}x")
        print(f"{'  of which waiting on the DataLoader':38}{c['data_wait_s']:9.2f}"
              f"{'':>6}({c['data_wait_s'] / c['seconds']:.0%})")
        print(f"{'    train loader':38}{c['train_data_wait_s']:9.2f}")
        print(f"{'    val + test loaders':38}{c['eval_data_wait_s']:9.2f}")
        print(f"{'  of which the rest (model, optimiser)':38}{c['compute_s']:9.2f}"
              f"{'':>6}({c['compute_s'] / c['seconds']:.0%})")
        for key in ("lenetlab_all_threads", "lenetlab_one_thread"):
            r = per_epoch[key]
            label = f"lenetlab train_trial, {r['threads']} thread(s)"
            print(f"{label:38}{r['seconds']:9.2f}{c['seconds'] / r['seconds']:9.1f}x")

    rows, lab, conv = report["comparison"], report["lenetlab"], report["conventional"]
    print("\n== Whole study: mean final test accuracy over seeds ==")
    print(f"{'variant':20}{'epochs':>7}{'conv.':>9}{'lenetlab':>10}{'diff':>9}{'tol.':>8}"
          f"  {'verdict':14}{'conv. s':>9}")
    for r in rows:
        if "lenetlab_test_mean" in r:
            verdict = "within noise" if r["within_noise"] else "OUTSIDE NOISE"
            lab_cols = (f"{r['lenetlab_test_mean']:10.4f}{r['difference']:+9.4f}"
                        f"{r['tolerance']:8.4f}  {verdict:14}")
        else:
            lab_cols = f"{'-':>10}{'-':>9}{'-':>8}  {'-':14}"
        print(f"{r['variant']:20}{r['epochs']:7d}{r['conventional_test_mean']:9.4f}"
              f"{lab_cols}{r['conventional_seconds']:9.1f}")
    if rows and "tolerance_rule" in rows[0]:
        print(f"tolerance: {rows[0]['tolerance_rule']}")

    print("\n== Whole study: wall time and memory ==")
    conv_epochs = conv["trial_epochs"]
    print(f"{'':34}{'wall s':>9}{'s/epoch':>9}{'peak RSS MiB':>14}")
    print(f"{'conventional (sequential, 1 proc)':34}{conv['seconds']:9.1f}"
          f"{conv['seconds'] / conv_epochs:9.2f}{conv['peak_rss_mib']:14.0f}")
    if "seconds" in lab:
        workers = cfg["lenetlab_workers"] or "default"
        rss = f"{lab['peak_rss_mib']:14.0f}" if lab.get("peak_rss_mib") else f"{'n/a':>14}"
        print(f"{'lenetlab study (workers: ' + str(workers) + ')':34}{lab['seconds']:9.1f}"
              f"{lab['seconds'] / conv_epochs:9.2f}{rss}  (largest single process)")
        if lab.get("peak_total_pss_mib"):
            print(f"{'':52}{lab['peak_total_pss_mib']:14.0f}  (PSS of all its "
                  f"{lab['processes_seen']} processes together)")
    print(f"s/epoch = wall time / {conv_epochs} trial-epochs (train + val + test each); the "
          "conventional time includes loading the data once, lenetlab's its whole process.")
    if "error" in lab:
        print(f"\nlenetlab study FAILED: {lab['error']}")
        return
    for warning in lab.get("warnings", []):
        print(f"WARNING, not the same work: {warning}")
    a = report.get("arithmetic")
    if a:
        peak = a["matmul_peak_gflops_per_core"] * a["cores"]
        print("\n== Arithmetic: where the floor is on this machine ==")
        print(f"work: {a['gflop_per_trial_epoch']:.1f} GFLOP per trial-epoch (convolutions and "
              f"matmuls, forward + backward, counted by torch), {a['study_gflop']:.0f} GFLOP "
              f"for the study")
        print(f"peak: {a['matmul_peak_gflops_per_core']:.0f} GFLOP/s per core (float32 "
              f"1024x1024 matmul, one thread) x {a['cores']} cores = {peak:.0f} GFLOP/s; "
              f"the study at that peak: {a['seconds_at_peak']:.0f} s")
        print(f"sustained: conventional {a['conventional_gflops']:.0f} GFLOP/s "
              f"({a['conventional_gflops'] / peak:.0%} of peak)"
              + (f", lenetlab {a['lenetlab_gflops']:.0f} GFLOP/s "
                 f"({a['lenetlab_gflops'] / peak:.0%})" if "lenetlab_gflops" in a else ""))
        print(f"{TARGET_SPEEDUP:.0f}x means {a['target_seconds']:.0f} s, i.e. "
              f"{a['target_share_of_peak']:.0%} of the matmul peak sustained over 1->6 and "
              "6->16 channel 5x5 convolutions at batch 64 (plus the elementwise work on top)")
    ratio = report["speedup"]
    verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
    noise = all(r.get("within_noise") for r in rows)
    print(f"\nSpeed-up (conventional / lenetlab wall time): {ratio:.1f}x "
          f"(target >= {TARGET_SPEEDUP:.0f}x: {verdict}); accuracies "
          f"{'all within seed noise' if noise else 'NOT all within seed noise'}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def default_data_dir() -> Path:
    env = os.environ.get("LENETLAB_DATA")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data" / "fashion-mnist").resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Wall time, accuracy and memory of lenetlab's study vs the conventional "
                    "DataLoader training loop, on the same data in one run.")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder with the four Fashion-MNIST IDX files "
                             "(default: $LENETLAB_DATA or ../shared/data/fashion-mnist)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v],
                        default=None, help="comma-separated (default: all five)")
    parser.add_argument("--epochs-scale", type=float, default=None,
                        help="multiply every recipe's epochs (rounded, at least 1; default 1.0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a shortened check: epochs scale {QUICK_EPOCHS_SCALE} and "
                             f"variants {','.join(QUICK_VARIANTS)} unless given")
    parser.add_argument("--skip-per-epoch", action="store_true",
                        help="skip the one-epoch section")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="num_workers of the conventional DataLoaders (default 0, as in "
                             "the tutorials)")
    parser.add_argument("--lenetlab-workers", type=int, default=None,
                        help="--workers passed to `lenetlab study` (default: its own)")
    parser.add_argument("--keep-run", type=Path, default=None,
                        help="run folder for `lenetlab study` (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.epochs_scale is None:
        args.epochs_scale = QUICK_EPOCHS_SCALE if args.quick else 1.0
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS) if args.quick else list(RECIPES)
    unknown = [v for v in args.variants if v not in RECIPES]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(RECIPES)})")
    if args.seeds < 1 or args.epochs_scale <= 0:
        parser.error("--seeds must be at least 1 and --epochs-scale positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"machine": machine_info(), "config": {
        "variants": args.variants, "seeds": args.seeds, "epochs_scale": args.epochs_scale,
        "loader_workers": args.loader_workers, "lenetlab_workers": args.lenetlab_workers,
        "data_dir": str(args.data_dir), "eval_batch_conventional": EVAL_BATCH}}
    default_threads = torch.get_num_threads()
    log("arithmetic: timing this machine's float32 matmul peak (one thread)")
    peak_per_core = matmul_peak_gflops()

    start = time.perf_counter()
    data = load_fashion_mnist(args.data_dir, download=False)
    load_s = time.perf_counter() - start
    batch_sizes = {RECIPES[v].batch_size for v in [*args.variants, "baseline"]}
    loaders = {b: conventional_loaders(data, b, args.loader_workers) for b in batch_sizes}

    # Conventional side first, so that this process's peak RSS is the conventional loop's.
    if not args.skip_per_epoch:
        log("per epoch: conventional loop, baseline, 1 epoch")
        conv_epoch = time_conventional_epoch(loaders[RECIPES["baseline"].batch_size])
    log(f"whole study: conventional loop, {default_threads} threads, "
        f"{len(args.variants)} variant(s) x {args.seeds} seed(s)")
    trials = []
    for name in args.variants:
        recipe = RECIPES[name]
        for seed in range(args.seeds):
            trials.append(conventional_trial(recipe, seed, loaders[recipe.batch_size],
                                             scale_epochs(recipe, args.epochs_scale).epochs))
    report["conventional"] = {
        "seconds": load_s + sum(t["seconds"] for t in trials), "load_s": load_s,
        "trial_epochs": sum(t["epochs"] for t in trials), "threads": default_threads,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trials": trials}

    if not args.skip_per_epoch:
        log("per epoch: lenetlab train_trial, baseline, 1 epoch")
        report["per_epoch"] = {
            "conventional": conv_epoch,
            "lenetlab_all_threads": time_lenetlab_epoch(data, default_threads),
            "lenetlab_one_thread": time_lenetlab_epoch(data, 1)}
    test_images = len(data.test_labels)
    del data, loaders

    with tempfile.TemporaryDirectory(prefix="lenetlab-bench-") as tmp:
        run_dir = args.keep_run or Path(tmp) / "run"
        report["lenetlab"] = run_lenetlab_study(args.variants, args.seeds, args.epochs_scale,
                                                args.data_dir, args.lenetlab_workers, run_dir)
    lab = report["lenetlab"]
    if "error" in lab:
        log(f"lenetlab study failed: {lab['error']}")
    else:
        report["speedup"] = report["conventional"]["seconds"] / lab["seconds"]
        missing = [v for v in args.variants if v not in lab["test"]]
        if missing:
            lab["error"] = f"summary.json has no config named {', '.join(missing)}"
    report["comparison"] = compare(trials, lab, args.variants)
    report["arithmetic"] = arithmetic(report["conventional"], lab, test_images, peak_per_core,
                                      usable_cores())

    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if "error" in lab else 0


if __name__ == "__main__":
    sys.exit(main())
