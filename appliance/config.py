"""Settings from flags, `WGJIT_*` environment variables and a TOML file.

Precedence is flag > environment > file > default, so an operator can keep a
fleet-wide file and override one value on one host. Every error names the key
and where it came from, because "invalid config" alone costs an operator an hour.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "WGJIT_"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the key and its source."""


@dataclass(frozen=True)
class Option:
    """One setting, declared once: the flag, the TOML key, the WGJIT_ variable, the
    default and the help all come from here (`add_flags`, `resolve`)."""

    name: str  # the flag's long name with dashes, e.g. "idle-timeout"
    type: Callable[[Any], Any] = str
    default: Any = None
    required: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a problem or None
    help: str = ""  # the flag's help; the default is appended by add_flags
    metavar: str | None = None
    repeat: bool = False  # a list: the flag may be given several times
    field: str | None = None  # the settings attribute, when not `key`

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def attribute(self) -> str:
        return self.field or self.key


def add_flags(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """A flag for each option. Every flag defaults to None, so that an unset flag
    leaves the value to the environment, the file and then the option's default
    (resolve), and the help shows that default from the declaration."""
    for o in options:
        text = o.help
        shown = o.default
        if shown not in (None, [], "") and not (o.type is BOOL and shown is False):
            if isinstance(shown, float) and shown.is_integer():
                shown = int(shown)
            text = f"{text} ({shown})" if text else f"({shown})"
        kwargs: dict[str, Any] = {"help": text or None, "default": None}
        if o.type is BOOL:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = o.metavar
            if o.repeat:
                kwargs["action"] = "append"
            elif o.type in (int, float):
                kwargs["type"] = o.type
        parser.add_argument(f"--{o.name}", **kwargs)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _parse_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _parse_urls(value: Any) -> list[str]:
    """One URL, or several: a TOML list, or text separated by commas or spaces."""
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    urls = []
    for item in items:
        url = str(item).strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or any(c in url for c in ", \t\n"):
            raise ValueError(f"{item!r} is not an http:// or https:// URL with a host")
        if parts.username or parts.password:
            # URLs end up in logs and metric labels; the token has its own 0600 file.
            raise ValueError("credentials do not belong in a URL; use the token file")
        if url in urls:
            raise ValueError(f"{item!r} is given twice")
        urls.append(url)
    if not urls:
        raise ValueError("no URL given")
    return urls


BOOL = _parse_bool
LIST = _parse_list
URLS = _parse_urls


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def host_port(value: Any) -> str | None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT with a port from 1 to 65535"
    return None


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p}: not found") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: not valid TOML: {e}") from e


def resolve(
    options: list[Option],
    flags: Mapping[str, Any],
    file_data: Mapping[str, Any] | None = None,
    section: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Resolve every option to a typed value, or raise ConfigError naming the key.

    `flags` holds argparse values (None when the flag was not given). In the file,
    a key may sit at the top level or in the `[section]` table; the table wins.
    Unknown keys in the section table are an error, so a typo does not pass silently.
    """
    environ = os.environ if environ is None else environ
    file_data = dict(file_data or {})
    table = file_data.get(section, {}) if section else {}
    if section and not isinstance(table, dict):
        raise ConfigError(f"config key {section!r}: must be a table")
    known = {o.key for o in options}
    for key in table:
        if key not in known:
            raise ConfigError(f"config key {section}.{key}: unknown setting")
    result: dict[str, Any] = {}
    for opt in options:
        raw, source = None, None
        if flags.get(opt.key) is not None:
            raw, source = flags[opt.key], f"--{opt.name}"
        elif opt.env in environ:
            raw, source = environ[opt.env], f"environment {opt.env}"
        elif opt.key in table:
            raw, source = table[opt.key], f"config key {section}.{opt.key}"
        elif opt.key in file_data and not isinstance(file_data[opt.key], dict):
            raw, source = file_data[opt.key], f"config key {opt.key}"
        if raw is None:
            if opt.required:
                raise ConfigError(
                    f"{opt.key}: required (give --{opt.name}, {opt.env}"
                    f" or '{opt.key}' in the config file)"
                )
            result[opt.key] = opt.default
            continue
        try:
            value = opt.type(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid value {raw!r}: {e}") from e
        if opt.check is not None and (problem := opt.check(value)):
            raise ConfigError(f"{source}: {problem} (got {raw!r})")
        result[opt.key] = value
    return result
