"""Shared by every benchmark: machine/versions, markdown tables, and docs/benchmarks.md sections.

Each benchmark owns one section of ``docs/benchmarks.md``, between ``<!-- begin NAME -->`` and
``<!-- end NAME -->`` markers, and rewrites only that section, so the scripts can be rerun in any
order (or on another machine) without touching each other's results.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
IMAGES = REPO / "docs" / "img"
HEADER = """# Benchmarks

Every table below was produced by a script in `benchmarks/`; each section names the command, the
machine, the library versions and the date of its run. Rerun a script to refresh its section
(the others are left as they are). Smoke modes (`--smoke-test`) only check that a script works:
they write to a temporary file, never here.
"""


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What a reader needs to compare numbers: CPU, cores, GPU, Python and library versions."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
    }
    for package in ("torch", "ray", "optuna", "mlflow", "numpy", "scipy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def command_line() -> str:
    """The command that ran this script, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (creating its folder) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_section(name: str, title: str, body: str, path: Path | None = None,
                  command: str | None = None) -> Path:
    """Replace (or append) section ``name`` of the benchmarks page with ``body``.

    The section starts with ``title``, the command and the machine, so every table says where it
    came from. ``path`` defaults to docs/benchmarks.md; smoke tests pass a temporary file.
    """
    path = Path(path or DOCS)
    info = machine_info()
    meta = "\n".join(f"- {key}: {value}" for key, value in info.items())
    section = (
        f"<!-- begin {name} -->\n## {title}\n\n"
        f"Command: `{command or command_line()}`\n\n<details><summary>Machine and versions"
        f"</summary>\n\n{meta}\n\n</details>\n\n{body.strip()}\n<!-- end {name} -->\n"
    )
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
