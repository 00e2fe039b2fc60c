"""The daemon's scheduler rules, with a real APScheduler and short periods."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.schedule import Jobs


def missed(metrics: GatewayMetrics, job: str) -> float:
    return metrics.missed_jobs.labels(job)._value.get()


@pytest.fixture
def jobs():
    metrics = GatewayMetrics()
    j = Jobs(metrics.missed_jobs)
    yield j, metrics
    j.shutdown()


def test_every_job_has_the_explicit_rules(jobs) -> None:
    j, _ = jobs
    j.every("a", 0.1, lambda: None)
    j.every("b", 30, lambda: None)
    j.start()
    a, b = j.scheduler.get_job("a"), j.scheduler.get_job("b")
    assert (a.coalesce, a.max_instances, a.misfire_grace_time) == (True, 1, 1)
    assert (b.coalesce, b.max_instances, b.misfire_grace_time) == (True, 1, 30)
    assert len(j.scheduler.get_jobs()) == 2


def test_an_overrunning_job_runs_alone_and_its_skips_are_counted(jobs, caplog) -> None:
    j, metrics = jobs
    running = 0
    most = 0
    lock = threading.Lock()

    def slow() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.55)
        with lock:
            running -= 1

    with caplog.at_level(logging.WARNING, logger="appliance.gateway.schedule"):
        j.every("slow", 0.1, slow, now=True)
        j.start()
        time.sleep(1.3)
    j.shutdown()
    assert most == 1
    # ~13 slots in 1.3 s, at most 3 runs: the rest were skipped and counted.
    assert missed(metrics, "slow") >= 7
    lines = [r for r in caplog.records if "slow" in r.getMessage()]
    assert len(lines) == 1, "one warning per minute per job, not one per skipped slot"
    assert "missed" in lines[0].getMessage()


def test_runs_folded_by_coalescing_after_a_stall_are_counted(jobs) -> None:
    # A paused scheduler stands in for a stalled process: on waking, the due
    # slots are folded into one run, which APScheduler itself does not report.
    j, metrics = jobs
    ran = []
    j.every("tick", 0.2, lambda: ran.append(time.monotonic()))
    j.start()
    time.sleep(0.5)
    assert missed(metrics, "tick") == 0
    j.scheduler.pause()
    n = len(ran)
    time.sleep(1.05)
    j.scheduler.resume()
    time.sleep(0.3)
    assert len(ran) - n <= 3  # one catch-up run (and maybe one more on time), not five
    assert 4 <= missed(metrics, "tick") <= 5


def test_a_failing_job_is_logged_with_its_traceback(jobs, caplog) -> None:
    j, _ = jobs
    done = threading.Event()

    def broken() -> None:
        done.set()
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR):
        j.every("broken", 0.05, broken, now=True)
        j.start()
        assert done.wait(2)
        time.sleep(0.1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info and "disk on fire" in str(errors[0].exc_info[1])


def test_reschedule_changes_the_period(jobs) -> None:
    j, metrics = jobs
    ran = []
    j.every("x", 5.0, lambda: ran.append(1))
    j.start()
    j.reschedule("x", 0.05)
    time.sleep(0.5)
    assert len(ran) >= 5
    assert j.period("x") == 0.05
    assert j.scheduler.get_job("x").misfire_grace_time == 1
    assert missed(metrics, "x") == 0  # a new grid is not a gap
