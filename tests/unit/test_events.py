"""Events as JSON lines, written by the log writer thread in batches."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging
from appliance.gateway import events
events.setup_logging("INFO", "json")
for i in range(2000):
    events.emit("peer_installed", public_key=f"k{i}", preshared_key="secret")
logging.getLogger("wgjit.test").warning("plain %s", "line")
events.emit("dropped_below_level", level=logging.DEBUG)
"""


def test_every_event_is_written_once_in_order_and_secrets_are_redacted() -> None:
    # A process of its own: logging is process-wide, and exit must drain the queue.
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60).stderr
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["public_key"] for e in lines[:-1]] == [f"k{i}" for i in range(2000)]
    assert {e["preshared_key"] for e in lines[:-1]} == {"(redacted)"}
    assert lines[-1]["msg"] == "plain line" and lines[-1]["logger"] == "wgjit.test"
    assert not any(e.get("event") == "dropped_below_level" for e in lines)
