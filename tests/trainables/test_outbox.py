"""The Train controller's outbox (``trainables/ray_report.py``), which a trial's driver polls for
its reports while the controller fills it from its own thread: a waiting poll returns as soon as
a report or the run's end arrives, and every report is handed over once, in order."""

import threading
import time

from trainables.ray_report import Outbox


def _put_later(box: Outbox, delay_s: float, *reports: dict, close: bool = False) -> None:
    """Put ``reports`` (and the end, with ``close``) from another thread after ``delay_s``."""
    def fill():
        time.sleep(delay_s)
        for report in reports:
            box.put(report)
        if close:
            box.close()

    threading.Thread(target=fill, daemon=True).start()


def test_a_waiting_poll_returns_when_a_report_arrives_and_each_report_comes_once():
    box = Outbox()
    _put_later(box, 0.3, {"epoch": 1})
    started = time.monotonic()
    assert box.take(30.0) == ([{"epoch": 1}], False)
    assert 0.25 < time.monotonic() - started < 5.0  # it waited for the report, not its timeout
    box.put({"epoch": 2})
    box.put({"epoch": 3})
    started = time.monotonic()
    assert box.take(30.0) == ([{"epoch": 2}, {"epoch": 3}], False)  # all of them, in order
    assert time.monotonic() - started < 1.0  # reports were there: no wait
    started = time.monotonic()
    assert box.take(0.2) == ([], False)  # nothing new: waits, then empty
    assert 0.15 < time.monotonic() - started < 2.0


def test_the_end_of_the_run_wakes_a_waiting_poll_with_the_last_reports():
    box = Outbox()
    _put_later(box, 0.3, close=True)
    started = time.monotonic()
    assert box.take(30.0) == ([], True)
    assert time.monotonic() - started < 5.0
    box = Outbox()
    box.put({"epoch": 8})
    box.close()
    assert box.take(30.0) == ([{"epoch": 8}], True)
    started = time.monotonic()
    assert box.take(30.0) == ([], True)  # ended: no waiting
    assert time.monotonic() - started < 1.0
