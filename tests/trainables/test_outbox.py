"""The Train controller's outbox (``trainables/ray_report.py``), which a trial's driver
long-polls for its reports instead of Ray's queue actor: a waiting poll returns as soon as a
report or the run's end arrives, and every report is handed over once, in order."""

import asyncio
import time

from trainables.ray_report import Outbox


def test_a_waiting_poll_returns_when_a_report_arrives_and_each_report_comes_once():
    async def scenario():
        box = Outbox()
        poll = asyncio.create_task(box.take(30.0))
        await asyncio.sleep(0.05)
        assert not poll.done()  # nothing to take yet: it waits
        box.put({"epoch": 1})
        assert await asyncio.wait_for(poll, 2.0) == ([{"epoch": 1}], False)
        box.put({"epoch": 2})
        box.put({"epoch": 3})
        started = time.monotonic()
        assert await box.take(30.0) == ([{"epoch": 2}, {"epoch": 3}], False)
        assert time.monotonic() - started < 1.0  # reports were there: no wait
        started = time.monotonic()
        assert await box.take(0.2) == ([], False)  # nothing new: waits, then empty
        assert 0.15 < time.monotonic() - started < 2.0

    asyncio.run(scenario())


def test_the_end_of_the_run_wakes_a_waiting_poll_with_the_last_reports():
    async def scenario():
        box = Outbox()
        poll = asyncio.create_task(box.take(30.0))
        await asyncio.sleep(0.05)
        box.close()
        assert await asyncio.wait_for(poll, 2.0) == ([], True)
        box = Outbox()
        box.put({"epoch": 8})
        box.close()
        assert await box.take(30.0) == ([{"epoch": 8}], True)
        assert await asyncio.wait_for(box.take(30.0), 2.0) == ([], True)  # no waiting

    asyncio.run(scenario())
