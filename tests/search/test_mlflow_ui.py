"""What a user meets in MLflow after a sweep: read back from a real server, then in a real browser.

One tiny sweep (real Ray, real ``mlflow server``) serves both checks: the runs, tags and metrics
the MLflow API returns, and what headless Chromium shows at the link the launcher printed.
"""

import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser import Browser, chromium
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from test_cli import launch, sweep_runs

from ifsearch.tracking.runs import (
    EXPERIMENT_KIND_TAG,
    SHARED_VIEW_TAG,
    TRIAL_TAG,
    MlflowTrialLogger,
    get_or_create_experiment,
)
from ifsearch.tracking.server import start_local_server, stop_local_server

SWEEP, TRIALS, METRIC = "ui", 3, "val_loss"  # TINY_SPACE's objective: val_loss, min


@dataclass
class Sweep:
    url: str  # the MLflow server
    experiment: str
    output: str  # what the launcher printed
    storage: Path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished tiny sweep on its own MLflow server (3 trials x 2 epochs, 2 at once)."""
    tmp = tmp_path_factory.mktemp("ui_sweep")
    server = start_local_server(tmp / "mlflow")
    try:
        with pytest.MonkeyPatch.context() as env:  # short trials: a system sample every second
            env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
            output = launch(tmp, server.url, "--name", SWEEP, "--num-samples", str(TRIALS),
                            "--max-epochs", "2", "--scheduler", "fifo").output
        yield Sweep(server.url, tmp.name, output, tmp / "sweeps")
    finally:
        stop_local_server(tmp / "mlflow")


def printed_links(output: str) -> list[str]:
    return re.findall(r"^MLflow UI: +(\S+)", output, re.M)


@pytest.mark.slow
def test_mlflow_holds_the_sweep_as_the_ui_shows_it(sweep):
    client, parents, trials = sweep_runs(sweep.url, sweep.experiment, SWEEP)
    experiment = client.get_experiment_by_name(sweep.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    # Trial runs are named after the sweep and Tune's creation order (its trial counter,
    # the number before "_" in each trial's experiment tag), and tagged with the trial id.
    tune_trials = tune.ExperimentAnalysis(str(sweep.storage / SWEEP)).trials
    expected = {t.trial_id: f"{SWEEP}/t{int(t.experiment_tag.split('_')[0]):02d}"
                for t in tune_trials}
    assert {r.data.tags[TRIAL_TAG]: r.info.run_name for r in trials} == expected
    assert sorted(expected.values()) == [f"{SWEEP}/t{n:02d}" for n in range(1, TRIALS + 1)]

    # The parent's best-so-far: one step per finished trial, the running minimum of the
    # trials' last values in the order MLflow saw them end.
    finished = sorted(trials, key=lambda r: r.info.end_time)
    running, best = [], float("inf")
    for run in finished:
        last = max(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)
        best = min(best, last.value)
        running.append(best)
    parent = parents[0].info.run_id
    for key in (f"best_{METRIC}", METRIC):  # a chart of its own; the table's column
        history = sorted(client.get_metric_history(parent, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, TRIALS + 1)), key
        assert [m.value for m in history] == running, key
        assert all(a >= b for a, b in zip(running, running[1:]))  # min: never rises

    # MLflow's own system metrics, sampled on the node of each trial's rank-0 worker.
    for run in trials:
        assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100, run.info.run_name
        assert run.data.metrics["system/system_memory_usage_megabytes"] > 0, run.info.run_name

    # The printed link (at the start and at the end) opens the sweep's shared runs view.
    links = printed_links(sweep.output)
    assert len(links) == 2 and links[0] == links[1]
    page = urllib.parse.urlsplit(links[0])
    assert f"{page.scheme}://{page.netloc}" == sweep.url
    path, _, query = page.fragment.partition("?")
    assert path == f"/experiments/{experiment.experiment_id}/runs"
    query = urllib.parse.parse_qs(query)
    assert query["workflowType"] == ["machine_learning"]
    view = json.loads(experiment.tags[SHARED_VIEW_TAG + query["viewStateShareKey"][0]])
    assert view["selectedColumns"][0] == f"metrics.`{METRIC}`"
    assert view["orderByKey"] == f"metrics.`{METRIC}`" and view["orderByAsc"] is True
    viewed = client.search_runs([experiment.experiment_id], view["searchFilter"])
    assert {r.info.run_id for r in viewed} == {r.info.run_id for r in parents + trials}


# The runs table: ag-grid rows (split into a pinned and a scrolling part, joined by row id).
RUNS_TABLE = """(() => {
  const rows = {};
  for (const row of document.querySelectorAll('.ag-row[row-id]')) {
    const entry = rows[row.getAttribute('row-id')] ??= {index: +row.getAttribute('row-index')};
    for (const cell of row.querySelectorAll('.ag-cell[col-id]'))
      entry[cell.getAttribute('col-id')] = cell.innerText;
  }
  const headers = [...document.querySelectorAll('.ag-header-cell[col-id]')]
    .map(cell => cell.getAttribute('col-id'));
  const headings = [...document.querySelectorAll('h2')].map(h => h.innerText);
  return {href: location.href, text: document.body ? document.body.innerText : "", headers,
          headings, rows};
})()"""


@pytest.mark.slow
def test_the_printed_link_shows_the_sweep_runs_in_chromium(sweep, tmp_path):
    if chromium() is None:
        pytest.fail("Chromium is not installed: `make chromium` installs Debian's package")
    client, parents, trials = sweep_runs(sweep.url, sweep.experiment, SWEEP)
    runs = {r.info.run_id: r for r in parents + trials}
    link = printed_links(sweep.output)[-1]
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.open(link)
        page = browser.wait_for(f"(t => Object.keys(t.rows).length >= {len(runs)} && "
                                f"Object.values(t.rows).every(r => r['metrics.`{METRIC}`']) && "
                                f"t)({RUNS_TABLE})", timeout=90)
        shot = browser.screenshot(tmp_path / "mlflow_runs.png")
    finally:
        browser.close()
    print(f"screenshot: {shot}")
    assert page, f"no runs table at {link}; see {shot}"
    # The runs view of the model-training UI ("Runs", the model registry in the side bar),
    # not the GenAI one (its overview, or "Training runs" beside traces and judges).
    assert "/runs?" in page["href"] and "Runs" in page["headings"]
    assert "Model registry" in page["text"] and "Judges" not in page["text"]
    assert f"metrics.`{METRIC}`" in page["headers"]  # the objective, without picking it
    shown = {run_id: row for run_id, row in page["rows"].items() if run_id in runs}
    assert set(shown) == set(runs) == set(page["rows"])  # the parent and every trial, only
    for run_id, row in shown.items():
        assert row["attributes.`Run Name`"].splitlines()[-1] == runs[run_id].info.run_name
        assert float(row[f"metrics.`{METRIC}`"]) == runs[run_id].data.metrics[METRIC]
    order = sorted(shown.values(), key=lambda row: row["index"])
    values = [float(row[f"metrics.`{METRIC}`"]) for row in order]
    assert values == sorted(values)  # best (lowest) first


def test_experiment_kind_is_set_when_missing_and_kept_when_chosen(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = get_or_create_experiment(client, "new")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # made before ifsearch tagged experiments
    assert get_or_create_experiment(client, "old") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    get_or_create_experiment(client, "chosen")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.parametrize("mode, best", [("max", 0.5), ("min", 0.3)])
def test_best_so_far_counts_finished_trials_and_skips_failed_ones(tmp_path, mode, best):
    space = SimpleNamespace(objective={"metric": "AP50", "mode": mode}, params={})
    logger = MlflowTrialLogger("http://127.0.0.1:9", "e", "s", space, max_epochs=2,
                               spool_path=tmp_path / "spool.jsonl")
    sent = []
    logger._send = sent.append

    def trial(trial_id, status, value):
        return SimpleNamespace(trial_id=trial_id, status=status, last_result={"AP50": value},
                               error_file=None)

    done = trial("a", Trial.TERMINATED, 0.3)
    failed = trial("b", Trial.ERROR, 0.9)  # reported before failing: not a candidate
    pending = trial("d", Trial.PENDING, None)
    current = trial("c", Trial.RUNNING, 0.5)  # Tune calls on_trial_complete before TERMINATED
    logger.on_trial_complete(0, [done, failed, current, pending], current)
    progress = [r for r in sent if r["kind"] == "progress"]
    assert len(progress) == 1 and progress[0]["step"] == 3
    assert progress[0]["metrics"] == {"AP50": best, "best_AP50": best}

    sent.clear()
    current.status, pending.status = Trial.TERMINATED, Trial.ERROR  # then one fails
    logger.on_trial_error(0, [done, failed, current, pending], pending)
    progress = [r for r in sent if r["kind"] == "progress"]
    assert progress[0]["step"] == 4 and progress[0]["metrics"]["AP50"] == best
