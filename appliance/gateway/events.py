"""Structured events: one JSON object per line, what operators (and the demo) read.

    {"ts": 1732540000.123, "level": "info", "event": "peer_installed",
     "public_key": "...", "endpoint": "198.51.100.2:41000"}

Public keys are identities, not secrets, and are logged; private and
preshared keys never reach an event.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("wgjit.events")

FORBIDDEN_FIELDS = frozenset({"private_key", "preshared_key", "token"})


def emit(event: str, level: int = logging.INFO, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    for name in FORBIDDEN_FIELDS & fields.keys():
        fields[name] = "(redacted)"
    # The record is made here rather than by log.log(): that looks up its caller
    # by walking the stack, for a file and line an event never shows, and a herd
    # of 10,000 clients emits ~40,000 events (~15% of the daemon's CPU went to
    # logging in a py-spy profile of bench/herd.py).
    record = log.makeRecord(log.name, level, "(event)", 0, event, (), None,
                            extra={"wgjit_event": event, "wgjit_fields": fields})
    log.handle(record)


class JsonFormatter(logging.Formatter):
    """Every log record as one JSON line; events keep their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": round(record.created, 6),
                               "level": record.levelname.lower()}
        event = getattr(record, "wgjit_event", None)
        if event is not None:
            obj["event"] = event
            obj.update(getattr(record, "wgjit_fields", {}))
        else:
            obj["logger"] = record.name
            obj["msg"] = record.getMessage()
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "wgjit_event", None)
        if event is None:
            return super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "wgjit_fields", {}).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {record.levelname} {event} {fields}".rstrip()


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler logs every job run at INFO; keep its warnings (missed runs).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
