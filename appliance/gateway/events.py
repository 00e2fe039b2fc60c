"""Structured events: one JSON object per line, what operators (and the demo) read.

    {"ts": 1732540000.123, "level": "info", "event": "peer_installed",
     "public_key": "...", "endpoint": "198.51.100.2:41000"}

Public keys are identities, not secrets, and are logged; private and
preshared keys never reach an event.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import logging.handlers
import queue
import threading
import time
from typing import Any, NamedTuple

log = logging.getLogger("wgjit.events")

FORBIDDEN_FIELDS = frozenset({"private_key", "preshared_key", "token"})


def enabled(level: int) -> bool:
    """Would an event at `level` be logged? For callers whose fields cost work."""
    return log.isEnabledFor(level)


def emit(event: str, level: int = logging.INFO, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    for name in FORBIDDEN_FIELDS & fields.keys():
        fields[name] = "(redacted)"
    # A herd of 10,000 clients emits ~60,000 events. When the writer thread is
    # the only place they go (setup_logging, nobody added a handler since), an
    # event goes to it as a tuple: a LogRecord and logging's handler walk cost
    # ~8 us an event on the threads that verify and install, ~10% of the
    # daemon's CPU in the herd, which is bound by one interpreter lock.
    if _direct is not None and logging.root.handlers == _direct[1] and not log.handlers:
        _direct[0].put(Event(time.time(), level, event, fields))
        return
    # Otherwise a record made here rather than by log.log(), which looks up its
    # caller by walking the stack, for a file and line an event never shows.
    record = log.makeRecord(log.name, level, "(event)", 0, event, (), None,
                            extra={"wgjit_event": event, "wgjit_fields": fields})
    log.handle(record)


class Event(NamedTuple):
    """An event on its way to the writer thread without a LogRecord (emit)."""

    created: float
    level: int
    event: str
    fields: dict[str, Any]


# One encoder for every line: json.dumps(default=...) builds a new one per call.
_ENCODE = json.JSONEncoder(default=str).encode


@functools.lru_cache(maxsize=64)
def _level_name(level: int) -> str:
    return logging.getLevelName(level).lower()


class JsonFormatter(logging.Formatter):
    """Every log record as one JSON line; events keep their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "wgjit_event", None)
        if event is not None and not record.exc_info:
            return self.format_event(Event(record.created, record.levelno, event,
                                           getattr(record, "wgjit_fields", {})))
        obj: dict[str, Any] = {"ts": round(record.created, 6),
                               "level": record.levelname.lower()}
        if event is not None:
            obj["event"] = event
            obj.update(getattr(record, "wgjit_fields", {}))
        else:
            obj["logger"] = record.name
            obj["msg"] = record.getMessage()
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)

    def format_event(self, e: Event) -> str:
        return _ENCODE({"ts": round(e.created, 6), "level": _level_name(e.level),
                        "event": e.event, **e.fields})


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "wgjit_event", None)
        if event is None:
            return super().format(record)
        return self.format_event(Event(record.created, record.levelno, event,
                                       getattr(record, "wgjit_fields", {})))

    def format_event(self, e: Event) -> str:
        fields = " ".join(f"{k}={v}" for k, v in e.fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(e.created))
        return (f"{stamp}.{int(e.created * 1000) % 1000:03d} {logging.getLevelName(e.level)} "
                f"{e.event} {fields}").rstrip()


class _Handoff(logging.handlers.QueueHandler):
    """Hands the record over as it is: formatting and the write happen on the
    listener's thread (QueueHandler.prepare would format it here, on the caller's)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


# How long exit may wait for the writer to drain the queue: a daemon told to stop
# in the middle of a herd must not overrun its stop timeout writing old lines.
DRAIN_AT_EXIT = 3.0


# Lines written with one write and one flush at most. StreamHandler writes and
# flushes each record; the writer was a sixth of the daemon's busy samples in a
# 10,000-client herd (~60,000 lines), mostly in those two calls per line.
WRITE_BATCH = 512


class _Writer(threading.Thread):
    """The one thread that formats and writes log records, until it gets None:
    whatever is queued when it wakes, up to WRITE_BATCH records, in one write."""

    def __init__(self, records: queue.SimpleQueue, handler: logging.StreamHandler) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.records = records
        self.handler = handler

    def run(self) -> None:
        while True:
            batch = [self.records.get()]
            while len(batch) < WRITE_BATCH and not self.records.empty():
                batch.append(self.records.get())
            lines = []
            for record in batch:
                if record is None:
                    self._write(lines)
                    return
                try:
                    if isinstance(record, Event):
                        lines.append(self.handler.formatter.format_event(record) + "\n")
                    else:
                        lines.append(self.handler.format(record) + "\n")
                except Exception:  # noqa: BLE001 - logging's own rule: report, go on
                    self.handler.handleError(logging.makeLogRecord({"msg": repr(record)}))
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self.handler.stream.write("".join(lines))
            self.handler.flush()
        except Exception:  # noqa: BLE001 - a closed or full stream must not end the thread
            self.handler.handleError(logging.makeLogRecord({"msg": "log write failed"}))


_writer: _Writer | None = None
# The writer's queue and the root handlers it was set up with (emit's fast path).
_direct: tuple[queue.SimpleQueue, list[logging.Handler]] | None = None


def stop_logging(timeout: float = DRAIN_AT_EXIT) -> None:
    """Write what is queued (for at most `timeout` s) and stop the writer; safe to repeat."""
    global _writer, _direct
    _direct = None
    if _writer is not None:
        _writer.records.put(None)
        _writer.join(timeout)
        _writer = None


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Log lines are written by one thread of their own.

    A herd of 10,000 clients makes ~60,000 events; with a StreamHandler on the
    root, every emitting thread took the handler's lock and wrote itself, and
    the capture thread spent ~40% of its samples waiting for that lock
    (py-spy, bench/herd.py). Now emitting is putting on a queue. The queue is
    drained at exit for up to DRAIN_AT_EXIT (SIGTERM ends the daemon
    normally); a SIGKILL loses the lines not yet written.
    """
    global _writer, _direct
    stop_logging()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord | Event | None] = queue.SimpleQueue()
    _writer = _Writer(records, handler)
    _writer.start()
    atexit.register(stop_logging)
    root = logging.getLogger()
    root.handlers[:] = [_Handoff(records)]
    root.setLevel(level)
    _direct = (records, list(root.handlers))
    # APScheduler logs every job run at INFO; keep its warnings (missed runs).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
