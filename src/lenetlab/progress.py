"""The display of a running study or sweep: done / running / failed, as a bar where one can be drawn."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm

from .records import Trial, TrialResult


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's, as in Jupyter, VS Code and Colab)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return shell is not None and "IPKernelApp" in shell.config


class Progress:
    """A tqdm bar on a terminal, tqdm.auto's in a notebook (a widget where ipywidgets is
    installed); elsewhere (a log, CI) one plain line per finished trial."""

    def __init__(self, quiet: bool, echo: Callable[[str], None]) -> None:
        self.echo, self.quiet = echo, quiet
        self.running = self.failed = 0
        self.bar = None

    def begin(self, todo: int, finished: int) -> None:
        if finished and not self.quiet:
            self.echo(f"resuming: {finished} trial(s) done, {todo} to run")
        if in_notebook():  # ipywidgets (the notebook extra) is imported here, not with lenetlab
            from tqdm.auto import tqdm as notebook_tqdm

            self.bar = notebook_tqdm(total=todo, desc="trials", unit="trial", disable=self.quiet)
        else:
            self.bar = tqdm(total=todo, desc="trials", unit="trial", file=sys.stderr,
                            disable=self.quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def start(self, trial: Trial) -> None:
        self.running += 1
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def done(self, result: TrialResult) -> None:
        self.running -= 1
        trial = result.trial
        if result.done:
            line = (f"done   {trial.config} seed {trial.seed}: test accuracy "
                    f"{result.test.accuracy:.4f} ({result.wall_time_s:.0f} s, {result.kernels} kernels)")
        else:
            self.failed += 1
            line = f"FAILED {trial.config} seed {trial.seed}: {result.error}"
        if self.quiet:
            pass
        elif self.bar.disable:
            self.echo(line)
        else:
            self.bar.write(line)  # above the bar, which stays at the bottom
        self.bar.set_postfix(running=self.running, failed=self.failed)
        self.bar.update(1)

    def note(self, line: str) -> None:
        if not self.quiet:
            self.echo(line) if self.bar is None or self.bar.disable else self.bar.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
