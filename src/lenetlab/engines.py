"""Where trials run: a local process pool (default) or a Ray cluster.

Trials are independent, so on one machine the fastest way to use every core is
several single-threaded processes side by side rather than one process with
many threads (LeNet-5's layers are too small to keep many threads busy). Each
local worker is a fresh process per trial, started from a forkserver that has
already imported torch; a worker that dies (killed, out of memory) costs only
its own trial, which is recorded as failed. The splits are made once per run, in
this process, in shared memory: every worker maps the same tensors instead of
decoding the IDX files and normalising the images again for each trial.
Once no trial is waiting for a worker, the cores of the workers that finish go
to the trials still running, from their next epoch on (_Cores).

Ray is the engine past one machine: each trial is a Ray task, the data set is
put in the object store once, each Ray worker process makes the splits from it
once (for every task of the run it runs), and results come back to this
process, which writes them into the run folder as they finish. A task that
reads this run's id in the run folder (rundir.reaches: a local instance, a shared
file system) checkpoints there itself; any other sends each checkpoint to the
run's CheckpointSink, an actor on this process's host that writes it into the run
folder. A task whose worker or host dies is retried by Ray (retries, --ray-retries)
and resumes from its trial's last checkpoint; an error of the trial itself is not
retried. Either way the trial is recorded once, here, when its task returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Protocol

from . import files
from .data import FashionMNIST, Splits, make_splits
from .errors import OptionError, OutputError
from .localpool import Worker, start_local_pool
from .options import DEFAULT_RAY_RETRIES
from .records import RunOptions, Trial, TrialResult
from .rundir import checkpoint_path, reaches, read_result, result_path, token_path
from .training import FileCheckpoint, OnEpoch, skip_dynamo_import
from .trials import execute_trial, record_failure, record_trial

OnStart = Callable[[Trial], None]
OnDone = Callable[[TrialResult], None]


class Referee(Protocol):
    """What a search gives the engines (tuning/referee.py): for each trial, where it trains, the
    function told each epoch's validation accuracy that answers whether to stop it (pruned).
    Picklable: it travels to the local workers and to Ray's referee actor."""

    def for_trial(self, trial: Trial) -> OnEpoch: ...



def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(device: str) -> int:
    """One worker per core on CPU; one on a GPU, where a single process already fills the queue."""
    return 1 if device.startswith("cuda") else usable_cores()


def check_engine(engine: str) -> None:
    """Refuse an engine that cannot run here, before a run folder is created."""
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise OptionError("engine", "{option} ray needs Ray: pip install 'lenetlab[ray]'") from None


def _die_with(pid: int) -> None:
    """Kill this worker as soon as process pid (the study) is gone, kill -9 included.

    The worker's parent is the forkserver, not the study, so the parent-death signal
    cannot be used; a thread waits on the study's pidfd instead (polls where Linux
    has none).
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
        except (AttributeError, OSError):  # no pidfd here: poll
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os.kill(os.getpid(), signal.SIGKILL)
                except PermissionError:
                    pass
        else:
            select.select([fd], [], [])
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lenetlab-watch-study", daemon=True).start()


class _Cores:
    """The torch threads each running local worker may use, in memory shared with the workers.

    A worker holds a slot while its trial runs and reads it at the start of every epoch. Once
    no trial is waiting for a worker, the cores the run holds (workers x threads, at most the
    usable cores, at least one worker's threads) are spread again over the workers still
    running each time one finishes: the last trials of a run do not train on one thread each
    beside idle cores. A share never shrinks. (A trial with PyTorch's kernels keeps its
    threads: see trials.execute_trial.)
    """

    def __init__(self, context, workers: int, threads: int) -> None:
        self.threads = threads
        self.budget = max(threads, min(workers * threads, usable_cores()))
        self.shares = context.RawArray("i", workers)
        self.free = list(range(workers))

    def take(self) -> int:
        slot = self.free.pop(0)
        self.shares[slot] = self.threads
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def spread(self, slots: list[int]) -> None:
        """The budget shared among the workers of slots; the first ones get any remainder."""
        for i, slot in enumerate(slots):
            share = self.budget // len(slots) + (1 if i < self.budget % len(slots) else 0)
            self.shares[slot] = max(self.shares[slot], share)


def _local_worker(trial: Trial, run_id: str, run_dir: str, options: RunOptions, splits: Splits,
                  checksums: dict[str, str], shares, slot: int, study_pid: int, report: Connection,
                  referee: Referee | None = None) -> None:
    """Entry point of a local worker process: one trial, its files written here.

    splits: the run's, in memory shared with the study (read, never written); shares[slot]:
    the threads the study gives this trial now (_Cores). A failure goes back to the study
    through report; a write that fails (a full disk) is fatal to the whole run, not to this
    trial alone.
    """
    _die_with(study_pid)
    skip_dynamo_import()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for everyone
    run = Path(run_dir)
    try:
        result, state_dict = execute_trial(trial, run_id, splits, options, checkpoint_path(run, trial),
                                           threads=lambda: shares[slot],
                                           on_epoch=referee.for_trial(trial) if referee else None,
                                           run_dir=run)
        record_trial(run, result, state_dict, checksums)
    except OutputError as exc:
        report.send(("fatal", str(exc)))
    except Exception as exc:  # a failed trial is reported, the others go on
        report.send(("failed", f"{type(exc).__name__}: {exc}"))


def run_local(trials: Iterable[Trial], run_id: str, run_dir: Path, options: RunOptions, data: FashionMNIST,
              workers: int, on_start: OnStart, on_done: OnDone, referee: Referee | None = None) -> None:
    """Run trials in at most `workers` processes at a time; call on_done with each result.

    trials: a list, or an iterator asked for the next trial only when a worker is free (a
    search asks its sampler then, once the trials before have told it what they found).
    """
    if isinstance(trials, (list, tuple)) and not trials:
        return
    run_dir = Path(run_dir).resolve()  # workers start in the forkserver's working directory
    context = mp.get_context("forkserver")
    start_local_pool()
    # Once per run; a worker moves them to options.device itself (a GPU's memory is not shared).
    splits = make_splits(data, options.split_seed, "cpu", options.train_subset).share_memory_()
    cores = _Cores(context, workers, options.threads)
    source, exhausted = iter(trials), False
    running: dict[int, tuple] = {}  # sentinel -> (process, trial, report connection, slot), oldest first
    try:
        while True:
            while not exhausted and len(running) < workers:
                trial = next(source, None)
                if trial is None:
                    exhausted = True
                    break
                # Drop a stale result of an earlier try so that only this run's file counts.
                result_path(run_dir, trial).unlink(missing_ok=True)
                receive, send = context.Pipe(duplex=False)
                slot = cores.take()
                process = Worker(
                    target=_local_worker, name=f"lenetlab-{trial.key}",
                    args=(trial, run_id, str(run_dir), options, splits, data.checksums, cores.shares, slot,
                          os.getpid(), send, referee))
                process.start()
                send.close()
                running[process.sentinel] = (process, trial, receive, slot)
                on_start(trial)
            if not running:
                break
            if exhausted:  # newest first: likeliest to have the most epochs left
                cores.spread([slot for *_, slot in reversed(running.values())])
            for sentinel in wait(list(running)):
                process, trial, receive, slot = running.pop(sentinel)
                process.join()
                cores.release(slot)
                try:
                    message = receive.recv()  # nothing was sent when the trial was recorded
                except EOFError:
                    message = None
                receive.close()
                if message and message[0] == "fatal":
                    raise OutputError(message[1])
                if message:
                    result = record_failure(run_dir, trial, run_id, message[1])
                else:
                    result = read_result(run_dir, trial, run_id, search=not splits.has_test)
                if result is None:
                    code = process.exitcode
                    how = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
                    result = record_failure(run_dir, trial, run_id, f"worker died ({how})")
                on_done(result)
    finally:
        for process, *_ in running.values():
            process.kill()
            process.join()


# This Ray worker process's splits, for the tasks of one run it runs: (key, splits).
_ray_splits: tuple[tuple, Splits] | None = None


def _ray_worker_splits(data_ref, options: RunOptions) -> Splits:
    """The run's splits in this Ray worker process, made from the object store's data set by
    the first of the run's tasks it runs; the next ones reuse them. Only the last run's are kept."""
    global _ray_splits
    import ray

    key = (data_ref.hex(), options.split_seed, options.train_subset, options.device)
    if _ray_splits is None or _ray_splits[0] != key:
        _ray_splits = None  # the previous run's go before this one's are made
        data = ray.get(data_ref)
        _ray_splits = key, make_splits(data, options.split_seed, options.device, options.train_subset)
    return _ray_splits[1]


class CheckpointSink:
    """A Ray actor on the driver's host, owned by the driver: the run folder's checkpoints for the
    tasks that do not reach the folder themselves.

    Each attempt of a trial first loads (its generation, the last checkpoint); a save of an
    older attempt (a task on a host that was lost but still runs) is refused, so only the
    attempt Ray retried writes the trial's checkpoint.
    """

    SUPERSEDED = "superseded"

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self.generations: dict[str, int] = {}

    def load(self, trial: Trial) -> tuple[int, bytes | None]:
        generation = self.generations[trial.key] = self.generations.get(trial.key, 0) + 1
        return generation, FileCheckpoint(checkpoint_path(self.run_dir, trial)).load()

    def save(self, trial: Trial, generation: int, data: bytes) -> str | None:
        """None once written; else why not (a full disk's one line, or SUPERSEDED)."""
        if generation != self.generations.get(trial.key):
            return self.SUPERSEDED
        try:
            FileCheckpoint(checkpoint_path(self.run_dir, trial)).save(data)
        except OutputError as exc:
            return str(exc)
        return None


class _SinkCheckpoint:
    """A trial's checkpoint kept by the run's CheckpointSink (training.CheckpointStore)."""

    def __init__(self, sink, trial: Trial) -> None:
        self.sink, self.trial, self.generation = sink, trial, 0

    def load(self) -> bytes | None:
        import ray

        self.generation, data = ray.get(self.sink.load.remote(self.trial))
        return data

    def save(self, data: bytes) -> None:
        import ray

        problem = ray.get(self.sink.save.remote(self.trial, self.generation, data))
        if problem == CheckpointSink.SUPERSEDED:
            raise RuntimeError(f"{self.trial.key}: a newer attempt of this trial runs elsewhere")
        if problem:
            raise OutputError(problem)


class RefereeHost:
    """A Ray actor on the driver's host holding a search's referee, for the tasks that run
    anywhere: each epoch's report goes there and the answer comes back."""

    def __init__(self, referee: Referee) -> None:
        self.referee = referee

    def epoch(self, trial: Trial, epoch: int, accuracy: float) -> bool:
        return self.referee.for_trial(trial)(epoch, accuracy)


class _RemoteReferee:
    """A Referee whose every answer comes from the run's RefereeHost actor."""

    def __init__(self, host) -> None:
        self.host = host

    def for_trial(self, trial: Trial) -> OnEpoch:
        import ray

        return lambda epoch, accuracy: ray.get(self.host.epoch.remote(trial, epoch, accuracy))


def _ray_trial(trial: Trial, run_id: str, data_refs: list, options: RunOptions, run_dir: str,
               sink, referee: Referee | None = None) -> tuple[TrialResult, dict]:
    """A Ray task: train one trial where Ray placed it, checkpointing into the run folder when it
    reaches it (this run's id is there), else through the run's sink.

    data_refs: [the data set's object ref], in a list so that Ray hands over the ref, not a copy
    of the data set for every task."""
    run = Path(run_dir)
    here = reaches(run, run_id)
    if here:
        store = FileCheckpoint(checkpoint_path(run, trial))
    else:
        store = _SinkCheckpoint(sink, trial)
    splits = _ray_worker_splits(data_refs[0], options)
    return execute_trial(trial, run_id, splits, options, store,
                         on_epoch=referee.for_trial(trial) if referee else None,
                         run_dir=run if here else None)


def run_trials(engine: str, trials: Iterable[Trial], run_id: str, run_dir: Path, options: RunOptions,
               data: FashionMNIST, workers: int, on_start: OnStart, on_done: OnDone,
               address: str | None = None, ray_retries: int = DEFAULT_RAY_RETRIES,
               referee: Referee | None = None) -> None:
    """Run trials on the engine a plan names: Ray's (at address, or a local instance) or the local pool."""
    if engine == "ray":
        run_ray(trials, run_id, run_dir, options, address, workers, data, on_start, on_done, ray_retries,
                referee=referee)
    else:
        run_local(trials, run_id, run_dir, options, data, workers, on_start, on_done, referee=referee)


def run_ray(trials: Iterable[Trial], run_id: str, run_dir: Path, options: RunOptions, address: str | None,
            workers: int, data: FashionMNIST, on_start: OnStart, on_done: OnDone,
            retries: int = DEFAULT_RAY_RETRIES, referee: Referee | None = None) -> None:
    """Run trials as Ray tasks on the cluster at address, or on a local Ray instance; a task
    whose worker or host dies runs again, up to retries times. trials: a list, all queued at
    once; or an iterator (a search), asked for the next trial as each of `workers` running ones
    ends."""
    check_engine("ray")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started_here = not ray.is_initialized()
    if started_here:
        init = {"address": address} if address else {"num_cpus": workers * options.threads}
        try:
            ray.init(**init, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        except Exception as exc:  # unreachable address, version mismatch, ...
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise OptionError("engine", f"{{option}} ray: cannot start or reach Ray"
                              f"{' at ' + address if address else ''} ({detail})") from None
    run_dir = Path(run_dir).resolve()  # the same folder for the sink and any task that reaches it
    sink = host = None
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        files.write_text(token_path(run_dir), run_id)
        # On this host (it holds the run folder), with no CPU: it only writes files.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        sink = ray.remote(num_cpus=0, scheduling_strategy=here)(CheckpointSink).remote(str(run_dir))
        data_ref = ray.put(data)  # shipped to the object store once, shared by every task
        if referee is not None:  # its storage is on this host: every task's epochs are judged here
            host = ray.remote(num_cpus=0, scheduling_strategy=here)(RefereeHost).remote(referee)
            referee = _RemoteReferee(host)
        # A dead worker or host: retried (it resumes from its last checkpoint). An exception
        # of the trial itself: failed at once.
        task = ray.remote(num_cpus=options.threads, max_retries=retries, retry_exceptions=False)(_ray_trial)
        futures, source = {}, iter(trials)
        dynamic = not isinstance(trials, (list, tuple))

        def submit() -> Trial | None:
            trial = next(source, None)
            if trial is not None:
                result_path(run_dir, trial).unlink(missing_ok=True)
                futures[task.remote(trial, run_id, [data_ref], options, str(run_dir), sink, referee)] = trial
            return trial

        # Ray runs about `workers` tasks at once; count those as running, the rest as queued.
        submitted = list(iter(submit, None)) if not dynamic else []
        for _ in range(workers if dynamic else 0):
            trial = submit()
            if trial is None:
                break
            submitted.append(trial)
        for trial in submitted[:workers]:
            on_start(trial)
        queued = submitted[workers:]
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            trial = futures.pop(done[0])
            if queued:
                on_start(queued.pop(0))
            try:
                outcome = ray.get(done[0])
            except Exception as exc:  # RayTaskError, WorkerCrashedError, ...
                if isinstance(getattr(exc, "cause", None), OutputError):
                    raise exc.cause from None  # a full disk where the task ran stops the run
                message = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                result = record_failure(run_dir, trial, run_id, f"{type(exc).__name__}: {message}")
            else:
                result = record_trial(run_dir, *outcome, data.checksums)
            on_done(result)
            if dynamic and (following := submit()) is not None:  # asked once this result is told
                on_start(following)
    finally:
        token_path(run_dir).unlink(missing_ok=True)
        for actor in (sink, host):
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # the cluster is gone: so is the actor; keep the first error
                    pass
        if started_here:
            ray.shutdown()
