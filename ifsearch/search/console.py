"""What a sweep prints: a quiet console for the person at the terminal, everything else to a file.

A sweep's console used to carry every Train worker's per-epoch prints, Ray Train's controller
logs, Tune's "Result for ..." dumps of every reported key and Ray's own warnings between the
status tables (~1,500 lines for the 8-trial demo). At the default verbosity the launcher now
shows only: one line per phase (Ray up, MLflow, the sweep started), the live trial table, one
line per finished/stopped/failed trial and the summary. The rest goes to ``launch.log`` in the
sweep folder, whose path is printed once; ``--verbose`` puts it all back on the terminal.

Which knob does what:

* Ray ``log_to_driver`` (``ray.init``, left on): Train workers' and trial drivers' stdout/stderr
  are forwarded to the launcher process, which prints them on its own stdout/stderr. Turning it
  off would lose them from the sweep's log (they would only be in Ray's session folder).
* The launcher's file descriptors 1 and 2 (:class:`Console`): at the default verbosity they
  point at ``launch.log``, so whatever reaches them (the forwarded worker logs, Tune's progress
  reporter and result dumps, Python ``logging`` of Ray/Tune, warnings from Ray's C++ core) lands
  in the file; the console keeps a duplicate of the terminal and writes only what this module
  says. Redirecting descriptors, not ``sys.stdout``, is what catches the C++ core's writes and
  those of threads that hold the original stream.
* Tune's ``CLIReporter`` (``RAY_AIR_NEW_OUTPUT=0``, ``verbose=3``): unchanged, it writes its
  table and result dumps, which is what ``--verbose`` shows and ``launch.log`` keeps.
* :class:`ProgressTable`, a Tune callback: the live table (status, searched parameters, epoch,
  objective, best so far), redrawn in place on a terminal and printed every ``refresh_seconds``
  otherwise (logs, CI), and the per-trial lines.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any

from ray import tune
from ray.tune.experiment import Trial

LOG_NAME = "launch.log"


def say(text: str = "") -> None:
    """A line for the person at the terminal: through the active :class:`Console`, else print."""
    if Console.active is not None:
        Console.active.say(text)
    else:
        print(text, flush=True)


class Console:
    """The terminal, kept for people while the process's stdout/stderr go to a log file.

    Use as a context manager. With ``verbose`` nothing is redirected: :meth:`say` prints to
    stdout like everything else. Lines said are also written to the log, so the file alone tells
    the whole story.

    Args:
        log_path: the file stdout/stderr go to (appended: a resumed sweep continues it).
        verbose: keep everything on the terminal.
    """

    active: Console | None = None  # the one in use: ``say`` and ``ProgressTable`` write to it

    def __init__(self, log_path: Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.terminal: IO[str] = sys.stdout
        self.is_tty = sys.stdout.isatty()
        self._saved: list[int] = []
        self._log: IO[str] | None = None

    def __enter__(self) -> Console:
        Console.active = self
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self._log = open(self.log_path, "a", buffering=1)
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        self.say(f"log (Ray, Ray Train and Tune output): {self.log_path}")
        return self

    def __exit__(self, *exc: object) -> None:
        Console.active = None
        if self.verbose or not self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        self.terminal.close()
        self.terminal = sys.stdout
        if self._log is not None:
            self._log.close()

    def say(self, text: str = "") -> None:
        """A line (or lines) for the person at the terminal, copied into the log."""
        self.terminal.write(text + "\n")
        self.terminal.flush()
        if self._log is not None:
            self._log.write(text + "\n")

    def write_raw(self, text: str) -> None:
        """Terminal control text (cursor moves) that must not go into the log."""
        self.terminal.write(text)
        self.terminal.flush()

    @property
    def width(self) -> int:
        return shutil.get_terminal_size((120, 40)).columns if self.is_tty else 120


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


class ProgressTable(tune.Callback):
    """The live trial table and one line per trial that ends (a Tune callback, driver side).

    It writes to the active :class:`Console` (none, or a verbose one: it stays silent and
    Tune's own reporter speaks), so the callback Tune saves with the experiment and restores on
    ``--resume`` needs no state of its own beyond the sweep's settings.

    Args:
        sweep: the sweep's name; trials are called ``<sweep>/tNN`` in creation order, as their
            MLflow runs are.
        params: the searched parameters (dotted keys), in the space's order.
        metric, mode: the objective.
        max_epochs: the budget of a trial that is not stopped early.
        refresh_seconds: how often the table is printed when the output is not a terminal.
        max_rows: trials listed; beyond it the running ones and the best finished ones.
    """

    def __init__(self, sweep: str, params: list[str], metric: str, mode: str,
                 max_epochs: int, refresh_seconds: float = 30.0, max_rows: int = 20) -> None:
        self.sweep = sweep
        self.params = params
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.refresh_seconds = refresh_seconds
        self.max_rows = max_rows
        self._drawn_lines = 0  # lines of the table now on a terminal (redrawn in place)
        self._last_print = -math.inf  # monotonic time starts near 0 at boot: never printed
        self._last_text = ""

    def __setstate__(self, state: dict) -> None:  # restored on --resume: a fresh terminal
        self.__dict__.update(state, _drawn_lines=0, _last_print=-math.inf, _last_text="")

    @property
    def console(self) -> Console | None:
        console = Console.active
        return None if console is None or console.verbose else console

    # -- Tune hooks ---------------------------------------------------------------------------

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.console is None:
            return
        now = time.monotonic()
        if self.console.is_tty or now - self._last_print >= self.refresh_seconds:
            self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0) or 0)
        if last.get("diverged"):
            how = f"FAILED (diverged at epoch {epoch + 1}: {last.get('error', '')})"
        elif epoch >= self.max_epochs:
            how = f"finished all {epoch} epochs"
        else:
            how = f"stopped early at epoch {epoch}"
        self._trial_line(trials, trial, how)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._trial_line(trials, trial, f"FAILED (error in {trial.error_file or 'its log'})")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.console is not None:
            self._show(trials, force=True)

    # -- drawing ------------------------------------------------------------------------------

    def name(self, trials: list[Trial], trial: Trial) -> str:
        return f"{self.sweep}/t{trials.index(trial) + 1:02d}"

    def _value(self, trial: Trial) -> float | None:
        value = (trial.last_result or {}).get(self.metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
                value) and trial.status != Trial.ERROR:
            return float(value)
        return None

    def best(self, trials: list[Trial]) -> tuple[Trial, float] | None:
        scored = [(t, v) for t in trials if (v := self._value(t)) is not None]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda item: item[1])

    def _trial_line(self, trials: list[Trial], trial: Trial, how: str) -> None:
        if self.console is None:
            return
        value = self._value(trial)
        score = f"  {self.metric} {_format(value)}" if value is not None else ""
        self._clear()
        self.console.say(f"{self.name(trials, trial)} {how}{score}")
        if self.console.is_tty:  # the line went above the table: draw it again below
            self._show(trials, force=True)

    def render(self, trials: list[Trial]) -> list[str]:
        """The table's lines: a summary line, a header and one row per listed trial."""
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        best = self.best(trials)
        summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        head = f"{self.sweep}: {len(trials)} trials ({summary})"
        if best is not None:
            head += f"; best {self.metric} {_format(best[1])} ({self.name(trials, best[0])})"
        listed = trials
        if len(trials) > self.max_rows:
            running = [t for t in trials if t.status == Trial.RUNNING]
            ranked = sorted((t for t in trials if self._value(t) is not None),
                            key=lambda t: self._value(t), reverse=self.mode == "max")
            keep = {id(t) for t in running + ranked[: max(self.max_rows - len(running), 0)]}
            listed = [t for t in trials if id(t) in keep]
        columns = ["trial", "status", "epoch", self.metric]
        rows = []
        for t in listed:
            last = t.last_result or {}
            rows.append([self.name(trials, t), t.status, _format(last.get("epoch", "")),
                         _format(last.get(self.metric, ""))])
        # Searched parameters, as many as fit the width (short names: the part after the dot).
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(columns)]
        used = sum(widths) + 2 * len(widths)
        hidden = 0
        for key in self.params:
            short = key.split(".", 1)[-1]
            cells = [_format(t.config.get(key, "")) for t in listed]
            width = max(len(short), *(len(c) for c in cells)) if cells else len(short)
            if used + width + 2 > self.console.width:
                hidden += 1
                continue
            columns.append(short)
            widths.append(width)
            for row, cell in zip(rows, cells):
                row.append(cell)
            used += width + 2
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if hidden:
            lines.append(f"({hidden} more searched parameters: see the MLflow runs)")
        if len(listed) < len(trials):
            lines.append(f"({len(trials) - len(listed)} more trials: see the MLflow runs)")
        return lines

    def _clear(self) -> None:
        if self.console.is_tty and self._drawn_lines:
            self.console.write_raw(f"\x1b[{self._drawn_lines}F\x1b[J")  # up N lines, clear below
            self._drawn_lines = 0

    def _show(self, trials: list[Trial], force: bool = False) -> None:
        if not trials:
            return
        text = "\n".join(self.render(trials))
        if text == self._last_text and not force and not self.console.is_tty:
            self._last_print = time.monotonic()
            return
        if self.console.is_tty:
            if text == self._last_text and self._drawn_lines:
                return
            self._clear()
            self.console.write_raw(text + "\n")
            self._drawn_lines = text.count("\n") + 1
        else:
            self.console.say(text)
        self._last_text = text
        self._last_print = time.monotonic()
