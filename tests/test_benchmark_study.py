"""benchmarks/study.py end to end in its --smoke-test mode: real sweeps, retrains, report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _processes_in(path: Path) -> list[str]:
    """Live processes running in ``path`` (cwd) or naming it: a left-over Ray or launcher."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(path)) or str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.slow
def test_smoke_study_writes_section_and_plot(tmp_path):
    out, images, work = tmp_path / "benchmarks.md", tmp_path / "img", tmp_path / "work"
    run = subprocess.run(
        [sys.executable, "benchmarks/study.py", "--smoke-test", "--out", str(out),
         "--images", str(images), "--work", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, RAY_DEDUP_LOGS="0"),
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "sweep influencer done" in run.stdout and "sweep hungarian done" in run.stdout

    text = out.read_text()
    section = text[text.index("<!-- begin study -->"):text.index("<!-- end study -->")]
    # the verdict, then the tables: sweeps, retrain summary, per seed, mask_prob, importances
    assert "Influencer" in section and "Hungarian" in section
    assert "| loss | space | trials |" in section
    assert "| variant | seeds | AP | AP50 | AP25 | duplicate rate |" in section
    assert "| variant | seed | AP | AP50 | AP25 |" in section
    for row in ("| Influencer (softmax, sweep's best) | 0 |",
                "| Hungarian (sweep's best) | 0 |"):
        # the flipped variant is whichever mask_prob the sweep did not pick
        assert row in section or row.replace("softmax", "sigmoid") in section
    assert any(f"Influencer ({c}, otherwise" in section for c in ("sigmoid", "softmax"))
    assert "| `loss.mask_prob` | sweep trials |" in section
    assert "| loss | rank | parameter | importance (PED-ANOVA) |" in section
    assert "| influencer | 1 |" in section and "| hungarian | 1 |" in section
    assert "`train.lr`" in section
    assert "python benchmarks/study.py --quick" in section and "--address=auto" in section
    assert "![AP50 and duplicate rate vs wall-clock time" in section
    assert "](img/study_ap50_vs_time.png)" in section  # relative to the markdown file

    plot = images / "study_ap50_vs_time.png"
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "retrain" / "hungarian" / "seed0" / "metrics.jsonl").exists()
    assert _processes_in(tmp_path) == []  # the launchers and their local Ray are gone
