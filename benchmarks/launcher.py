"""Running ``python -m ifsearch.launch`` as a subprocess from a benchmark.

The launcher is started in its own session, so it and the local Ray it starts form one process
group that a benchmark can interrupt (SIGINT = Ctrl-C: Tune saves and the launcher exits
normally) and reap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launcher_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the launcher runs elsewhere)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def end_launcher(proc: subprocess.Popen, grace: float) -> None:
    """Stop the launcher's process group (the launcher and its local Ray): SIGINT, then harder.

    A launcher that finished has already shut its Ray down; this only acts on an interrupted or
    failed one.
    """
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
            time.sleep(0.5)
