"""Best-config export: ``best_config.yaml`` is the fully resolved Config of the best trial.

Written at the end of every sweep, and again later from MLflow with
``python -m ifsearch.export --experiment NAME [--top K] [--metric AP50 --mode max]``. The file
loads with ``python -m ifsearch.train --config`` and seeds ``python -m ifsearch.launch
--warm-start``; ``best_trial.json`` beside it records the metrics, trial id and checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from ifsearch.config import Config, load_config, save_config
from ifsearch.errors import IfsearchError
from ifsearch.search.plan import resolve_tracking_uri
from ifsearch.search.space import KNOWN_METRICS
from ifsearch.tracking.runs import ROLE_TAG, SWEEP_TAG, TRIAL_TAG, tag_filter


def write_best_config(config: Config, output: str | Path, details: dict[str, Any]) -> Path:
    """Write ``output`` (the config) and ``<stem>_trial.json`` (metrics, trial, checkpoint)."""
    output = save_config(config, output)
    sidecar = output.with_name(f"{output.stem}_trial.json")
    sidecar.write_text(json.dumps(details, indent=2, default=str) + "\n")
    return output


def export_from_mlflow(experiment: str, tracking_uri: str, output: str | Path = "best_config.yaml",
                       metric: str = "AP50", mode: str = "max", top: int = 1,
                       sweep: str | None = None) -> list[Path]:
    """Write the config of the best trial run (and of ranks 2..top as ``<stem>_rank<i>.yaml``).

    Trials are ranked by the metric's last logged value (the last epoch a trial ran), the same
    scope the sweep uses to pick its best trial.
    """
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise IfsearchError(f"no MLflow experiment {experiment!r} at {tracking_uri}; "
                            f"experiments there: {names}")
    tags = {ROLE_TAG: "trial", **({SWEEP_TAG: sweep} if sweep else {})}
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=tag_filter(tags),
        order_by=[f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}"],
        max_results=max(top, 1) * 4,  # runs lacking the metric sort last; keep a margin
    )
    runs = [r for r in runs if metric in r.data.metrics][:top]
    if not runs:
        raise IfsearchError(f"experiment {experiment!r} has no trial run with metric {metric!r}"
                            + (f" in sweep {sweep!r}" if sweep else ""))
    output = Path(output)
    written = []
    for rank, run in enumerate(runs, start=1):
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
            config = load_config(local)
        target = output if rank == 1 else output.with_name(f"{output.stem}_rank{rank}.yaml")
        written.append(write_best_config(config, target, {
            "rank": rank,
            "metric": metric,
            "mode": mode,
            "metrics": run.data.metrics,
            "trial_id": run.data.tags.get(TRIAL_TAG),
            "sweep": run.data.tags.get(SWEEP_TAG),
            "mlflow_run_id": run.info.run_id,
            "checkpoint": run.data.tags.get("ifsearch.checkpoint"),
        }))
        print(f"#{rank} {run.info.run_name}: {metric}={run.data.metrics[metric]:.4f} -> {target}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifsearch.export",
        description="Write best_config.yaml from the trial runs logged to MLflow.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking server (default: $MLFLOW_TRACKING_URI, else the local "
                             "server started by ifsearch.launch under runs/mlflow)")
    parser.add_argument("--sweep", default=None, help="only trials of this sweep (its --name)")
    parser.add_argument("--metric", default="AP50", choices=KNOWN_METRICS,
                        help="metric to rank trials by (default AP50)")
    parser.add_argument("--mode", default="max", choices=("max", "min"))
    parser.add_argument("--top", type=int, default=1,
                        help="also write the configs ranked 2..K as <stem>_rank<i>.yaml")
    parser.add_argument("--output", default="best_config.yaml", help="where to write the config")
    args = parser.parse_args(argv)
    try:
        uri = resolve_tracking_uri(args.mlflow_uri, start_local=False)
        export_from_mlflow(args.experiment, uri, args.output, args.metric, args.mode, args.top,
                           args.sweep)
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
