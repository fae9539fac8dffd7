"""The local pool's processes: its forkserver, started early and stopped fast, and its workers.

The workers are launched without the user's main module. No torch here: the command starts the
forkserver before it imports torch itself, so that both import it at once on two cores.
"""

from __future__ import annotations

import io
import multiprocessing.forkserver
import os
import signal
from multiprocessing import context as mp_context
from multiprocessing import popen_forkserver, reduction, spawn, util

# What the forkserver imports once, before it forks any worker. Not torch._dynamo (slow, hundreds
# of modules): the native step's workers never import it (training.skip_dynamo_import); a worker
# on PyTorch's step imports it at its first step.
WORKER_PRELOAD = ["lenetlab.engines"]


class _Popen(popen_forkserver.Popen):
    """multiprocessing's forkserver launch, less the main module: multiprocessing would have each
    worker run the user's script again as __mp_main__ (a plain script's call to lenetlab.study
    included), and a trial needs nothing from it. The rest is popen_forkserver.Popen._launch."""

    def _launch(self, process_obj) -> None:
        prep_data = {key: value for key, value in spawn.get_preparation_data(process_obj._name).items()
                     if key not in ("init_main_from_name", "init_main_from_path")}
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, w = multiprocessing.forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)  # the child's sentinel of this process, as multiprocessing keeps it
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


class Worker(mp_context.ForkServerProcess):
    """A local worker: a forkserver process that does not import the user's main module."""

    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


def start_local_pool(preload: list[str] | None = None) -> None:
    """Start the forkserver that local workers fork from now, not at the first trial: its
    imports (WORKER_PRELOAD and preload, torch's above all) then run beside the run's own checks
    and data loading on another core. Idempotent (a forkserver already running keeps its
    imports); the forkserver exits with this process."""
    multiprocessing.forkserver.set_forkserver_preload(WORKER_PRELOAD + list(preload or []))
    multiprocessing.forkserver.ensure_running()


def stop_local_pool() -> None:
    """Kill this process's forkserver, if it started one, and reap it: for an exit that skips
    the interpreter's teardown (cli.run). Told to stop the usual way, the forkserver frees
    torch's modules for a second or more after this process is gone, holding the stdout and stderr it
    inherited, so a pipe reading the command stays open that long. It holds nothing else: its
    workers have finished or been killed by then, and its socket's folder is gone with the
    exit handlers (multiprocessing's), so only the process is left to end."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # gone already
        pass
