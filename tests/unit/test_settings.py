"""Each setting is declared once (appliance/gateway/settings.py, the registry's
SERVE_OPTIONS): its default must not be written again anywhere the appliance or
the deploy could read it."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest

from appliance.cli import build_parser
from appliance.gateway.cache import CachePolicy
from appliance.gateway.evict import EvictionPolicy
from appliance.gateway.settings import OPTIONS, GatewaySettings, default
from appliance.registry.cli import CLIENT_OPTIONS, SERVE_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
# Where settings are declared: the only places their defaults may be written.
DECLARED = {"appliance/gateway/settings.py", "appliance/registry/cli.py",
            "appliance/transport.py"}
SCANNED = ["appliance/**/*.py", "wgjit_deploy/**/*.py", "wgjit_deploy/templates/*",
           "group_data/*.py", "inventory/*.py", "deploy.py"]


def _literals(value: object) -> list[str]:
    """How a default may be spelled in Python, TOML or help text."""
    if isinstance(value, bool) or value in (None, 0, 1, "", []):
        return []  # too common to mean anything
    if isinstance(value, (int, float)):
        whole = int(value) if float(value).is_integer() else None
        spellings = {repr(value), repr(float(value))}
        if whole is not None:
            spellings |= {str(whole), f"{whole:_}"}
        return [rf"(?<![\w.]){re.escape(s)}(?![\w.])" for s in spellings]
    if isinstance(value, str) and re.search(r"[\d/:]", value):
        return [re.escape(value)]  # addresses and paths, not words like "auto"
    return []


def _code(path: str, text: str) -> list[str]:
    """The file's lines with Python comments and docstrings blanked: prose may
    quote a default (a measurement, a comparison); code and config may not."""
    lines = text.splitlines()
    if not path.endswith(".py"):  # systemd units and TOML: whole-line comments
        return ["" if line.lstrip().startswith("#") else line for line in lines]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            for n in range(node.lineno - 1, node.end_lineno):
                lines[n] = ""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return lines


def _offences(options, files: dict[str, str]) -> list[str]:
    code = {path: _code(path, text) for path, text in files.items()}
    found = []
    for o in options:
        names = rf"\b({re.escape(o.key)}|{re.escape(o.name)})\b"
        for pattern in _literals(o.default):
            for path, lines in code.items():
                for n, line in enumerate(lines, 1):
                    if re.search(names, line) and re.search(pattern, line):
                        found.append(f"{path}:{n}: {o.name} default again: {line.strip()}")
    return found


def _sources() -> dict[str, str]:
    files = {}
    for glob in SCANNED:
        for p in ROOT.glob(glob):
            rel = str(p.relative_to(ROOT))
            if p.is_file() and rel not in DECLARED:
                files[rel] = p.read_text()
    return files


def test_no_default_is_written_twice() -> None:
    # The client's "timeout" is too common a word to search for.
    options = [*OPTIONS, *SERVE_OPTIONS, *(o for o in CLIENT_OPTIONS if o.name != "timeout")]
    assert _offences(options, _sources()) == []


def test_the_check_finds_a_default_written_again() -> None:
    planted = {"daemon.py": "idle_timeout: float = 300.0  # five minutes\n"
                            "# Not this one: a comment may say idle_timeout is 300.\n",
               "gateway.py": 'listen_port=data.get("wg_listen_port", 51820),\n'
                             'idle_timeout=data.get("idle_timeout", 300)\n',
               "gateways.toml.j2": "stale_ttl = 86_400\n",
               "serve.py": 'parser.add_argument("--listen", help="default 127.0.0.1:8080")\n'}
    found = _offences([*OPTIONS, *SERVE_OPTIONS], planted)
    assert sorted(f.split(":")[0] for f in found) == [
        "daemon.py", "gateway.py", "gateway.py", "gateways.toml.j2", "serve.py"], found


def test_settings_policies_and_flags_take_the_declared_defaults(capsys) -> None:
    settings = GatewaySettings(interface="wg0", registries=["http://127.0.0.1:1"],
                               token_file="t")
    for o in OPTIONS:
        if not o.required:
            assert getattr(settings, o.attribute) == default(o.name), o.name
    assert EvictionPolicy() == EvictionPolicy(settings.idle_timeout, settings.handshake_grace,
                                              settings.max_peers)
    policy = CachePolicy()
    assert (policy.positive_ttl, policy.negative_ttl, policy.stale_ttl) == \
        (settings.positive_ttl, settings.negative_ttl, settings.stale_ttl)
    # Flags default to None (so the environment and the file still count) and
    # their help shows the declared default.
    run = build_parser().parse_args(["gateway", "run"])
    assert all(getattr(run, o.key) is None for o in OPTIONS)
    help_text = _help(capsys, ["gateway", "run"])
    assert "evict after this idle (300)" in help_text
    assert "(127.0.0.1:9587)" in help_text
    assert "threads per worker (4)" in _help(capsys, ["registry", "serve"])


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_gateway_settings_fields_are_the_options() -> None:
    fields = {f.name for f in dataclasses.fields(GatewaySettings)}
    assert fields == {o.attribute for o in OPTIONS}
