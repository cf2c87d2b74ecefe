"""Was the machine idle? CPU used by processes outside a benchmark, sampled while it runs.

Timings on a shared machine mean little when other processes compete for the cores. ``OtherLoad``
samples ``/proc`` once a second and adds up the CPU time of every process that is not the
benchmark itself or one of its descendants (the launcher, its local Ray, the MLflow server it
started): the average number of cores the rest of the machine used, which decides the verdict.
``/proc/loadavg`` before the run is kept too, for information. The benchmark's own processes are
added up as well, by process title (``ray::TrialController``, ``raylet``, ...): where Ray's CPU
goes. Linux only; elsewhere the numbers are absent and the verdict says so.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

BUSY_CORES = 0.25  # others using more than a quarter of a core on average: not idle
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every readable process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name (2nd field) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS)
    return table


_SCRIPTS = ("raylet", "gcs_server", "dashboard.py", "agent.py", "log_monitor.py",
            "monitor.py", "ifsearch.launch", "mlflow")


def process_title(pid: int) -> str:
    """A short name for a process: Ray's title (``ray::TrialController``) or its program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if words and words[0].startswith("ray::"):
        return words[0].split(" ")[0].split(".")[0]
    for word in words[:3]:  # the program and its script (later words are options)
        for script in _SCRIPTS:
            if word.endswith(script) or word == script:
                return script
    # A title Ray set by hand holds spaces (``ray-dashboard-NodeHead-0 (...)``): its first word.
    return Path(words[0].split(" ")[0]).name if words else "?"


def _descendants(root: int, table: dict[int, tuple[int, float]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours, stack = set(), [root]
    while stack:
        pid = stack.pop()
        ours.add(pid)
        stack.extend(children.get(pid, []))
    return ours


class OtherLoad:
    """Context manager: average cores used by processes outside this one's tree while inside.

    Attributes:
        loadavg_before: the 1-minute load average when sampling began (None off Linux).
        cores: other processes' CPU seconds / wall seconds (None off Linux or before exit).
        peak: the busiest one-second interval, in cores.
        ours: CPU seconds of this process's descendants while inside, by ``process_title``.
        wall: seconds inside.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.loadavg_before: float | None = None
        self.cores: float | None = None
        self.peak = 0.0
        self.ours: dict[str, float] = {}
        self.wall = 0.0
        self._cpu = 0.0
        self._titles: dict[int, str] = {}
        self._pid_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> OtherLoad:
        if not Path("/proc/loadavg").exists():
            return self
        self.loadavg_before = float(Path("/proc/loadavg").read_text().split()[0])
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="OtherLoad", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.wall = time.monotonic() - self._started
        self.cores = self._cpu / max(self.wall, 1e-9)
        for pid, cpu in self._pid_cpu.items():
            title = self._titles[pid]
            self.ours[title] = self.ours.get(title, 0.0) + cpu

    def _run(self) -> None:
        me = os.getpid()
        previous = _processes()
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            current = _processes()
            ours = _descendants(me, current)
            used = 0.0
            for pid, (_, cpu) in current.items():
                # A process new since the last sample started since then: all its CPU counts
                # (pid reuse within one interval is rare enough to ignore).
                delta = cpu - previous[pid][1] if pid in previous else cpu
                if pid in ours:
                    if pid != me:
                        self._pid_cpu[pid] = self._pid_cpu.get(pid, 0.0) + delta
                        # A Ray worker is "python", then "ray::IDLE" until it holds an
                        # actor ("ray::TrialController"), and may be caught inside a call
                        # titled by its function ("ray::execute"): keep the actor's class
                        # (capitalised) once seen.
                        title = self._titles.get(pid, "")
                        if not (title.startswith("ray::") and title[5:6].isupper()
                                and title != "ray::IDLE"):
                            # An exiting process has no command line left ("?"): keep its name.
                            new = process_title(pid)
                            self._titles[pid] = title if new == "?" and title else new
                    continue
                used += delta
            now = time.monotonic()
            self._cpu += used
            self.peak = max(self.peak, used / max(now - last, 1e-9))
            previous, last = current, now

    @property
    def busy(self) -> bool:
        """Others used more than ``BUSY_CORES`` on average while inside.

        Only the measured CPU of other processes counts: the load average before the run is
        shown but not judged, since it still holds whatever ran in the last minutes, such as
        the benchmark's own previous mode.
        """
        return self.cores is not None and self.cores > BUSY_CORES

    def verdict(self) -> str:
        """One line for a benchmark's output and its docs section."""
        if self.cores is None:
            return "machine load: not measured (no /proc)"
        state = "NOT idle: other processes competed for the cores" if self.busy else "idle"
        return (f"machine load: {state} (other processes used {self.cores:.2f} cores on "
                f"average, {self.peak:.2f} at peak; 1-min load average {self.loadavg_before:.2f} "
                "before the run)")

