"""The daemon's one scheduler, and an account of the runs that did not happen.

Every housekeeping job is an interval job with the same explicit rules: one
run at a time (max_instances=1); after a stall, one catch-up run rather than a
burst (coalesce); a run that cannot start within one period of its slot is
dropped (misfire grace), since the next slot is at most a period away.

APScheduler reports a dropped run (missed) and a refused one (the previous
run still going), but not the slots that coalescing folded away. Interval
slots fall on a fixed grid, so the distance between two submitted slots tells
how many were folded: those are counted as missed too. The metric counts
every one; the log says so at most once a minute per job, since a job that
overruns a 0.1 s period would otherwise write ten lines a second.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobEvent,
)
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import Counter

log = logging.getLogger(__name__)

MISSED_LOG_EVERY = 60.0  # seconds between warnings about one job's missed runs


class Jobs:
    def __init__(self, missed: Counter, clock: Callable[[], float] = time.monotonic) -> None:
        self.missed = missed  # labelled by job id
        self._clock = clock
        # APScheduler warns once per skipped or late slot itself; this class
        # says it instead, rate-limited. Its errors (a job raised) still show.
        quiet = logging.getLogger(f"{__name__}.apscheduler")
        quiet.setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors").setLevel(logging.ERROR)
        self.scheduler = BackgroundScheduler(timezone=UTC, logger=quiet)
        self.scheduler.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MISSED
                                    | EVENT_JOB_MAX_INSTANCES)
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()  # reschedule vs shutdown (see reschedule)
        self._stopping = False
        self._period: dict[str, float] = {}
        self._last_slot: dict[str, datetime] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def every(self, job_id: str, seconds: float, fn: Callable[[], object], *,
              now: bool = False) -> None:
        """Run fn every `seconds`; `now`: first run at once instead of after one period."""
        with self._lock:
            self._period[job_id] = seconds
        self.scheduler.add_job(fn, "interval", seconds=seconds, id=job_id, name=job_id,
                               coalesce=True, max_instances=1,
                               misfire_grace_time=max(1, math.ceil(seconds)),
                               **({"next_run_time": datetime.now(UTC)} if now else {}))

    def period(self, job_id: str) -> float:
        return self._period[job_id]

    def reschedule(self, job_id: str, seconds: float) -> None:
        """A new period, counted from now (a new slot grid: the gap count restarts)."""
        with self._lock:
            self._period[job_id] = seconds
            self._last_slot.pop(job_id, None)
        # APScheduler's shutdown(wait=True) holds its job store lock while it waits
        # for running jobs, and reschedule_job needs that lock: a job that
        # reschedules itself (the handshake check's pace) during shutdown hung the
        # daemon's stop (seen with py-spy after a 10,000-client herd). So a job
        # store change and the start of shutdown exclude each other, and none is
        # made once shutdown began.
        with self._stop_lock:
            if self._stopping:
                return
            self.scheduler.reschedule_job(job_id, trigger="interval", seconds=seconds)
            self.scheduler.modify_job(job_id, misfire_grace_time=max(1, math.ceil(seconds)))

    def remove(self, job_id: str) -> None:
        """Stop running job_id, if it is scheduled."""
        with self._lock:
            self._period.pop(job_id, None)
            self._last_slot.pop(job_id, None)
        if self.scheduler.get_job(job_id) is not None:
            self.scheduler.remove_job(job_id)

    def start(self) -> None:
        self.scheduler.start()

    @property
    def running(self) -> bool:
        return self.scheduler.running

    def shutdown(self) -> None:
        with self._stop_lock:
            self._stopping = True
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def _on_event(self, event: JobEvent) -> None:
        lost = 0
        if event.code in (EVENT_JOB_SUBMITTED, EVENT_JOB_MAX_INSTANCES):
            lost += self._folded(event.job_id, event.scheduled_run_times)
        if event.code in (EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED):
            lost += 1
        if lost:
            self._account(event.job_id, lost, "still running" if
                          event.code == EVENT_JOB_MAX_INSTANCES else "late")

    def _folded(self, job_id: str, slots: list[datetime]) -> int:
        """Slots skipped since the previous one we saw (coalesced away)."""
        if not slots:
            return 0
        with self._lock:
            period = self._period.get(job_id)
            last = self._last_slot.get(job_id)
            self._last_slot[job_id] = slots[-1]
        if period is None or last is None:
            return 0
        return max(0, round((slots[-1] - last).total_seconds() / period) - 1)

    def _account(self, job_id: str, lost: int, why: str) -> None:
        self.missed.labels(job_id).inc(lost)
        now = self._clock()
        with self._lock:
            total = self._unlogged.get(job_id, 0) + lost
            if now - self._logged_at.get(job_id, -math.inf) < MISSED_LOG_EVERY:
                self._unlogged[job_id] = total
                return
            self._unlogged[job_id] = 0
            self._logged_at[job_id] = now
        log.warning("scheduled job %s: %d run(s) missed (latest: %s); every %.3g s", job_id,
                    total, why, self._period.get(job_id, 0.0))
