"""The run folders under a directory, one line each: what each holds and what state it is in.

`lenetlab runs [DIR]` prints them: kind, configurations and seeds, trials done and failed, the
best test accuracy (a search: its trials, pruned ones apart, and its best validation accuracy),
and the state: finished, interrupted (resumable), in use by a process, or
damaged. Nothing is written: the lock is probed without being taken.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RunDirError
from .markup import plain
from .rundir import plan_path, read_plan, read_results
from .summary import load_summary
from .tunerecords import (
    BEST,
    CONFIRM,
    is_tune_run,
    read_search_results,
    read_tune_plan,
    read_tune_summary,
    summary_path,
)


@dataclass(frozen=True)
class RunState:
    path: Path
    kind: str = "?"
    configs: int = 0
    seeds: int = 0
    done: int = 0
    failed: int = 0
    best: tuple[str, float] | None = None  # (configuration, mean test accuracy)
    state: str = "finished"  # finished, interrupted, in use by process N, damaged (why)
    search: str | None = None  # a search's trials and best, said instead of configurations and seeds

    def line(self) -> str:
        if self.search is not None:
            return plain(f"{self.path.name}  {self.kind}  {self.search}  {self.state}")
        best = f"best {self.best[0]} {self.best[1]:.4f}" if self.best else "best -"
        return plain(f"{self.path.name}  {self.kind}  {self.configs} config(s) x {self.seeds} seed(s)  "
                     f"{self.done} done, {self.failed} failed  {best}  {self.state}")


def _holder(run_dir: Path) -> str | None:
    """The pid holding the run folder's lock, or None when nobody holds it."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def describe_search(run_dir: Path) -> RunState:
    """A search's folder: its trials so far (pruned ones are no failures) and, once finished, its
    best trial's validation accuracy and the confirmation's test accuracy."""
    try:
        plan = read_tune_plan(run_dir)
    except RunDirError as exc:
        return RunState(run_dir, "tune", state=f"damaged ({exc})")
    budget = plan.spec.trials
    holder = _holder(run_dir)
    if holder is None and summary_path(run_dir).exists():
        try:
            summary = read_tune_summary(run_dir)
            confirmation = load_summary(run_dir / CONFIRM)
            tested = confirmation.config(BEST).final
        except RunDirError as exc:
            return RunState(run_dir, "tune", state=f"damaged ({exc})")
        except KeyError:
            return RunState(run_dir, "tune", state=f"damaged ({CONFIRM}: no {BEST} configuration)")
        best = summary.best_row
        test = f"test {tested['test'].mean:.4f}" if tested else "test -"
        return RunState(run_dir, "tune", state="finished", search=(
            f"{len(summary.trials)} of {budget} trial(s): {summary.count('complete')} complete, "
            f"{summary.count('pruned')} pruned, {summary.count('failed')} failed  best val {best.value:.4f} "
            f"(trial {best.number}), {test}"))
    ended = read_search_results(run_dir, plan.run_id)
    counts = {state: sum(r.status == state for r in ended) for state in ("done", "pruned", "failed")}
    best = max((r.final("val") for r in ended if r.done), default=None)
    state = f"in use by process {holder}" if holder else "interrupted: lenetlab resume finishes it"
    return RunState(run_dir, "tune", state=state, search=(
        f"{len(ended)} of {budget} trial(s): {counts['done']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed  best val {f'{best:.4f}' if best is not None else '-'}"))


def describe(run_dir: Path) -> RunState:
    """What run_dir holds; a folder whose files lenetlab cannot trust is 'damaged (why)'."""
    run_dir = Path(run_dir)
    if is_tune_run(run_dir):
        return describe_search(run_dir)
    try:
        plan = read_plan(run_dir)
    except RunDirError as exc:
        return RunState(run_dir, state=f"damaged ({exc})")
    results = read_results(run_dir, plan).values()
    counts = dict(kind=plan.kind, configs=len(plan.configs), seeds=len(plan.seeds),
                  done=sum(r.done for r in results), failed=sum(not r.done for r in results))
    holder = _holder(run_dir)
    if holder is not None:
        return RunState(run_dir, **counts, state=f"in use by process {holder}")
    resumable = "interrupted: lenetlab resume finishes it"
    if counts["done"] + counts["failed"] < len(plan.configs) * len(plan.seeds):
        return RunState(run_dir, **counts, state=resumable)
    if not (run_dir / "summary.json").exists():  # stopped while finalizing
        return RunState(run_dir, **counts, state=resumable)
    try:
        best = load_summary(run_dir).best_config
    except RunDirError as exc:
        return RunState(run_dir, **counts, state=f"damaged ({exc})")
    state = "finished, with failures: lenetlab resume reruns them" if counts["failed"] else "finished"
    return RunState(run_dir, **counts, best=(best.name, best.final["test"].mean) if best else None,
                    state=state)


def list_runs(folder: Path) -> list[RunState]:
    """Every run folder directly under folder (a subfolder with a run.json), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunDirError(f"{folder}: no such folder")
    return [describe(p) for p in sorted(folder.iterdir()) if p.is_dir() and plan_path(p).exists()]
