"""benchmarks/loss_speed.py runs end to end in --smoke-test mode and writes a well-formed table.

Timing goals live in the benchmark's own output, never here: these tests check shape, not speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import loss_speed  # noqa: E402


def _table_rows(text: str, header: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and data rows of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    cells = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return cells, rows


def test_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "benchmarks.md"
    results = loss_speed.main(["--smoke-test", "--device", "cpu", "--out", str(out)])

    text = out.read_text()
    assert "<!-- begin loss_speed -->" in text and "<!-- end loss_speed -->" in text
    assert "Loss speed: Influencer Loss vs Hungarian matching" in text
    headers, rows = _table_rows(text, "| N | M | K |")
    assert headers == loss_speed.HEADERS
    for column in ("influencer ms", "hungarian ms", "floor ms", "Hungarian/Influencer",
                   "Influencer/floor"):
        assert column in headers
    expected = loss_speed.grid(smoke=True)
    assert len(rows) == len(results) == len(expected)
    for row, case in zip(rows, expected):
        assert [int(row[0]), int(row[1]), int(row[2]), int(row[3])] == [
            case.n, case.m, case.k, case.batch]
        assert row[headers.index("device")] == "cpu"
        assert row[headers.index("mask_prob")] == case.mask_prob
        assert row[headers.index("variant")] == case.variant
        for column in ("influencer ms", "hungarian ms", "floor ms", "Hungarian/Influencer",
                       "Influencer/floor"):
            assert float(row[headers.index(column)]) > 0, (column, row)
    assert {r.case.mask_prob for r in results} == {"softmax", "sigmoid"}
    assert any(r.case.aux for r in results)  # the deep-supervision row runs too
    assert {r.case.variant for r in results} == {"geometric", "arithmetic", "geometric + spill"}
    assert not list(tmp_path.glob("*.png"))  # no plot in smoke mode


def test_targets_partition_seventy_percent_of_points():
    import torch

    g = torch.Generator().manual_seed(0)
    target = loss_speed.make_targets(1000, 7, g, "cpu")
    masks = target["masks"]
    assert masks.shape == (7, 1000) and target["labels"].shape == (7,)
    assert masks.sum(0).max() == 1  # disjoint
    assert masks.any(1).all()  # no empty instance
    assert masks.sum() == 700  # 70% foreground, the rest background


def test_plot_draws_the_n_sweep(tmp_path):
    m, k = loss_speed.GOAL[1:]
    results = [
        loss_speed.Result(loss_speed.Case(n, m, k), "cpu", n / 100, n / 10, n / 200)
        for n in (1000, 2000, 4000)
    ]
    results.append(loss_speed.Result(loss_speed.Case(2000, 8, k), "cpu", 1.0, 2.0, 0.5))
    path = loss_speed.plot(results, tmp_path / "loss_speed.png")
    assert path is not None and path.stat().st_size > 0
    assert loss_speed.plot(results[-1:], tmp_path / "none.png") is None  # nothing to sweep
