"""The quiet console: what the terminal gets, what the log gets, and the live trial table."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

from ifsearch.search.console import Console, ProgressTable


def _trial(status, epoch=None, value=None, config=None, **extra):
    last = {} if epoch is None else {"epoch": epoch, "AP50": value, **extra}
    return SimpleNamespace(status=status, last_result=last, config=config or {},
                           error_file="/tmp/err.txt")


def test_console_sends_library_output_to_the_log_and_says_lines_on_the_terminal(tmp_path):
    # A child process: its stdout is a pipe we read, as a terminal would show it.
    script = textwrap.dedent(f"""
        import os, sys
        from ifsearch.search.console import Console
        with Console({str(tmp_path / "launch.log")!r}) as console:
            print("(RayTrainWorker pid=1) epoch 1")          # Python's sys.stdout
            sys.stderr.write("Result for train_driver_fn: {{...}}\\n")
            os.write(1, b"[C++] PreemptionWatcher warning\\n")  # a raw descriptor write
            console.say("sweep started")
        print("after the sweep")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    terminal = out.stdout + out.stderr
    assert "sweep started" in terminal and "after the sweep" in terminal
    assert f"log (Ray, Ray Train and Tune output): {tmp_path / 'launch.log'}" in terminal
    for noise in ("RayTrainWorker", "Result for", "PreemptionWatcher"):
        assert noise not in terminal
    log = (tmp_path / "launch.log").read_text()
    for line in ("RayTrainWorker", "Result for", "PreemptionWatcher", "sweep started"):
        assert line in log
    assert "after the sweep" not in log  # the descriptors were restored


def test_verbose_console_redirects_nothing(tmp_path, capsys):
    with Console(tmp_path / "launch.log", verbose=True) as console:
        print("worker line")
        console.say("phase line")
    out = capsys.readouterr().out
    assert "worker line" in out and "phase line" in out
    assert not (tmp_path / "launch.log").exists()


class _Recorder:
    is_tty = False
    width = 200
    verbose = False

    def __init__(self):
        self.lines = []

    def say(self, text=""):
        self.lines += text.splitlines()

    def write_raw(self, text):
        raise AssertionError("no cursor moves without a terminal")


def _active(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(Console, "active", rec)
    return rec


def test_table_is_silent_without_a_quiet_console(monkeypatch):
    table = ProgressTable("demo", [], "AP50", "max", max_epochs=4)
    monkeypatch.setattr(Console, "active", None)
    table.on_step_end(0, [_trial("RUNNING", 1, 0.1)])  # nothing to write to: no error
    verbose = _Recorder()
    verbose.verbose = True  # --verbose: Tune's own reporter speaks
    monkeypatch.setattr(Console, "active", verbose)
    table.on_step_end(0, [_trial("RUNNING", 1, 0.1)])
    assert verbose.lines == []


def test_table_lists_status_epoch_objective_params_and_best_so_far(monkeypatch):
    rec = _active(monkeypatch)
    table = ProgressTable("demo", ["train.lr", "loss.mask_prob"], "AP50", "max",
                          max_epochs=4)
    trials = [_trial("TERMINATED", 4, 0.61, {"train.lr": 0.001, "loss.mask_prob": "softmax"}),
              _trial("RUNNING", 2, 0.70, {"train.lr": 0.0005, "loss.mask_prob": "sigmoid"}),
              _trial("PENDING", config={"train.lr": 0.01, "loss.mask_prob": "softmax"})]
    lines = table.render(trials)
    assert lines[0] == ("demo: 3 trials (1 pending, 1 running, 1 terminated); "
                        "best AP50 0.7 (demo/t02)")
    assert lines[1].split() == ["trial", "status", "epoch", "AP50", "lr", "mask_prob"]
    assert lines[2].split() == ["demo/t01", "TERMINATED", "4", "0.61", "0.001", "softmax"]
    assert lines[3].split() == ["demo/t02", "RUNNING", "2", "0.7", "0.0005", "sigmoid"]
    assert lines[4].split() == ["demo/t03", "PENDING", "0.01", "softmax"]
    table.mode = "min"  # the best follows the mode
    assert table.render(trials)[0].endswith("best AP50 0.61 (demo/t01)")


def test_one_line_per_ending_trial_says_how_it_ended(monkeypatch):
    rec = _active(monkeypatch)
    table = ProgressTable("demo", [], "AP50", "max", max_epochs=4)
    done = _trial("TERMINATED", 4, 0.5)
    stopped = _trial("TERMINATED", 2, 0.1)
    diverged = _trial("TERMINATED", 1, float("nan"), diverged=True, error="DivergenceError: x")
    failed = _trial("ERROR", 1, 0.2)
    trials = [done, stopped, diverged, failed]
    for t in (done, stopped, diverged):
        table.on_trial_complete(0, trials, t)
    table.on_trial_error(0, trials, failed)
    assert rec.lines == [
        "demo/t01 finished all 4 epochs  AP50 0.5",
        "demo/t02 stopped early at epoch 2  AP50 0.1",
        "demo/t03 FAILED (diverged at epoch 2: DivergenceError: x)",
        "demo/t04 FAILED (error in /tmp/err.txt)",
    ]


def test_without_a_terminal_the_table_is_printed_every_refresh_period_only(monkeypatch):
    rec = _active(monkeypatch)
    table = ProgressTable("demo", [], "AP50", "max", max_epochs=4, refresh_seconds=3600)
    trials = [_trial("RUNNING", 1, 0.1)]
    table.on_step_end(0, trials)
    printed = len(rec.lines)
    assert printed > 0
    trials[0].last_result["epoch"] = 2
    table.on_step_end(1, trials)  # within the period: nothing new
    assert len(rec.lines) == printed
    table.refresh_seconds = 0
    table.on_step_end(2, trials)
    assert len(rec.lines) == 2 * printed


def test_long_sweeps_list_the_running_and_the_best_trials(monkeypatch):
    rec = _active(monkeypatch)
    table = ProgressTable("big", [], "AP50", "max", max_epochs=4, max_rows=3)
    trials = [_trial("TERMINATED", 4, v / 10) for v in range(10)] + [_trial("RUNNING", 1, 0.0)]
    names = [line.split()[0] for line in table.render(trials)[2:] if line.startswith("big/")]
    assert names == ["big/t09", "big/t10", "big/t11"]  # the two best finished + the running
    assert table.render(trials)[-1] == "(8 more trials: see the MLflow runs)"


def test_every_hook_of_the_table_is_a_tune_callback_hook():
    from ray import tune

    hooks = [name for name in vars(ProgressTable) if name.startswith("on_")]
    assert hooks and all(callable(getattr(tune.Callback, name, None)) for name in hooks), hooks
