"""The CLI contract: every command answers --help, and the documented flags exist."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from appliance.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


COMMANDS = [p for p, _ in _walk(build_parser())]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "wgjit")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path, "--help"])
    assert e.value.code == 0
    assert "usage: wgjit" in capsys.readouterr().out


CONTRACT = {
    ("registry", "serve"): ["--db", "--listen", "--workers"],
    ("token", "create"): ["--db", "--scope", "--tenant"],
    ("peer", "add"): ["--registry", "--token-file", "--tenant", "--public-key", "--allowed-ip",
                      "--preshared-key-file"],
    ("peer", "list"): ["--registry", "--token-file"],
    ("peer", "show"): ["--registry", "--token-file"],
    ("peer", "revoke"): ["--registry", "--token-file"],
    ("peer", "delete"): ["--registry", "--token-file"],
    ("gateway", "run"): ["--interface", "--registry", "--token-file", "--listen-port",
                         "--private-key-file", "--state-dir", "--metrics-listen",
                         "--idle-timeout", "--evict-interval", "--backend"],
}


@pytest.mark.parametrize("path,flags", CONTRACT.items(), ids=lambda x: " ".join(x))
def test_contract_flags(path, flags):
    parsers = dict(_walk(build_parser()))
    known = {s for a in parsers[path]._actions for s in a.option_strings}
    assert set(flags) <= known, set(flags) - known
    assert "--config" in known


def test_building_the_parser_leaves_prometheus_unimported():
    # `wgjit registry serve` sets PROMETHEUS_MULTIPROC_DIR before prometheus_client
    # is imported; imported earlier (once, by a gateway module pulled in through the
    # parser), every worker kept its own counters and /metrics lost the requests.
    code = ("import sys; from appliance.cli import build_parser; build_parser(); "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
