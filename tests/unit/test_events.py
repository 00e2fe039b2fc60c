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


TEXT = """
import logging
from appliance.gateway import events
events.setup_logging("INFO", "text")
events.emit("peer_evicted", level=logging.WARNING, public_key="k1", reason="idle")
root = logging.getLogger()
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append(record.wgjit_event)
root.addHandler(Keep())  # a handler added later: events go through logging again
events.emit("peer_installed", public_key="k2")
assert seen == ["peer_installed"], seen
"""


def test_text_lines_and_a_handler_added_later_still_gets_every_event() -> None:
    out = subprocess.run([sys.executable, "-c", TEXT], capture_output=True, text=True,
                         check=True, timeout=60).stderr.splitlines()
    assert out[0].endswith(" WARNING peer_evicted public_key=k1 reason=idle"), out
    assert out[1].endswith(" INFO peer_installed public_key=k2"), out
