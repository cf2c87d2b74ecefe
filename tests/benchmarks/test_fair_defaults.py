"""benchmarks/fair_defaults.py runs end to end in --smoke-test mode and writes its tables.

It trains every variant for one epoch on tiny scenes, so only the shape is checked: one row per
training variant, one per (variant, inference setting), and resumption skips finished runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import fair_defaults  # noqa: E402


@pytest.mark.slow
def test_smoke_run_writes_every_variant_and_resumes(tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    work = tmp_path / "work"
    args = ["--smoke-test", "--output", str(out), "--work", str(work)]
    assert fair_defaults.main(args) == 0
    text = out.read_text()
    assert "<!-- begin fair_defaults -->" in text and "<!-- end fair_defaults -->" in text
    for variant in fair_defaults.TRAIN_VARIANTS:
        rows = [line for line in text.splitlines() if line.startswith(f"| {variant} |")]
        # one row in the training table, one per inference setting, one in the AP50 curve table
        assert len(rows) == 1 + len(fair_defaults.EVAL_VARIANTS) + 1, variant
    for name in fair_defaults.EVAL_VARIANTS:
        assert f"| {name} |" in text
    capsys.readouterr()
    assert fair_defaults.main(args) == 0  # everything trained: nothing is trained again
    jobs = len(fair_defaults.TRAIN_VARIANTS)
    assert f"{jobs} of {jobs} runs already done; training 0" in capsys.readouterr().out
