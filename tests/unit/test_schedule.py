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


def wait_until(pred, timeout: float = 20.0) -> None:
    """Wait for an outcome, not for a time: generous, since the machine may be loaded."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_runs_folded_by_coalescing_after_a_stall_are_counted(jobs) -> None:
    # A paused scheduler stands in for a stalled process: on waking, the due
    # slots are folded into one run, which APScheduler itself does not report.
    # No bound depends on how fast this machine is: slots sit on a fixed grid, so
    # what the pause must have folded follows from how long it measurably lasted,
    # and runs plus misses can never exceed the slots that elapsed.
    j, metrics = jobs
    period = 0.2
    ran: list[float] = []
    started = time.monotonic()
    j.every("tick", period, lambda: ran.append(time.monotonic()), now=True)
    j.start()
    wait_until(lambda: len(ran) >= 2)
    j.scheduler.pause()
    paused = time.monotonic()
    before_runs, before_missed = len(ran), missed(metrics, "tick")
    time.sleep(2.0)  # ten slots
    resumed = time.monotonic()
    j.scheduler.resume()
    # Every slot wholly inside the pause but the one run on waking was folded and counted.
    folded_at_least = int((resumed - paused) / period) - 1
    assert folded_at_least >= 8
    wait_until(lambda: len(ran) > before_runs
               and missed(metrics, "tick") - before_missed >= folded_at_least)
    runs_after = len(ran) - before_runs
    now = time.monotonic()
    # One catch-up run, not one per folded slot: at most that run and the slots that
    # came due since waking (and one at the edge).
    assert runs_after <= 2 + (now - resumed) / period
    # Nothing is counted twice: runs and misses together fit in the slots that elapsed.
    assert len(ran) + missed(metrics, "tick") <= 2 + (now - started) / period


def test_a_failing_job_is_logged_with_its_traceback(jobs, caplog) -> None:
    j, _ = jobs
    done = threading.Event()

    def broken() -> None:
        done.set()
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR):
        j.every("broken", 0.05, broken, now=True)
        j.start()
        assert done.wait(20)
        wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info and "disk on fire" in str(errors[0].exc_info[1])


def test_reschedule_changes_the_period(jobs) -> None:
    j, metrics = jobs
    ran = []
    j.every("x", 5.0, lambda: ran.append(1))
    j.start()
    rescheduled = time.monotonic()
    j.reschedule("x", 0.05)
    wait_until(lambda: len(ran) >= 5)  # the old 5 s period would take 25 s
    assert j.period("x") == 0.05
    assert j.scheduler.get_job("x").misfire_grace_time == 1
    # A new grid is not a gap: runs and misses fit in the new grid's slots (a stall on a
    # loaded machine may fold some, and those count).
    assert len(ran) + missed(metrics, "x") <= 2 + (time.monotonic() - rescheduled) / 0.05


def test_a_job_rescheduling_itself_during_shutdown_does_not_hang_the_stop(jobs) -> None:
    jobs, _ = jobs
    # The handshake check paces itself with reschedule; APScheduler's shutdown
    # waits for running jobs while holding the lock reschedule_job needs.
    running, shutting = threading.Event(), threading.Event()

    def job() -> None:
        running.set()
        shutting.wait(5)
        time.sleep(0.2)  # shutdown is under way now
        jobs.reschedule("pacer", 3.0)

    jobs.every("pacer", 0.05, job)
    jobs.start()
    assert running.wait(5)
    stopper = threading.Thread(target=jobs.shutdown)
    stopper.start()
    shutting.set()
    stopper.join(10)
    assert not stopper.is_alive(), "shutdown hung on the job's reschedule"
