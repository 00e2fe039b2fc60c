from __future__ import annotations

import os

import pytest

from appliance import config
from appliance.config import ConfigError, Option
from appliance.secrets import SecretFileError, read_secret, write_secret

OPTS = [
    Option("registry", required=True),
    Option("idle-timeout", float, 300.0, check=config.positive),
    Option("listen", default="127.0.0.1:9000", check=config.host_port),
    Option("verbose", config.BOOL, False),
]


def test_precedence_flag_env_file_default():
    file = {"gateway": {"registry": "http://file", "idle_timeout": 60}}
    env = {"WGJIT_IDLE_TIMEOUT": "90"}
    s = config.resolve(OPTS, {"registry": None}, file, "gateway", env)
    assert s == {"registry": "http://file", "idle_timeout": 90.0, "listen": "127.0.0.1:9000",
                 "verbose": False}
    s = config.resolve(OPTS, {"idle_timeout": 30.0}, file, "gateway", env)
    assert s["idle_timeout"] == 30.0


def test_top_level_keys_and_section_table():
    s = config.resolve(OPTS, {}, {"registry": "http://top", "gateway": {"verbose": "yes"}},
                       "gateway", {})
    assert s["registry"] == "http://top" and s["verbose"] is True


@pytest.mark.parametrize("file,env,needle", [
    ({"gateway": {"idle_timeout": "soon"}}, {}, "config key gateway.idle_timeout"),
    ({"gateway": {"idle_timeout": -1}}, {}, "gateway.idle_timeout: must be greater than 0"),
    ({"gateway": {"listen": "9000"}}, {}, "gateway.listen: must be HOST:PORT"),
    ({"gateway": {"idle_timout": 5}}, {}, "gateway.idle_timout: unknown setting"),
    ({"gateway": {}}, {"WGJIT_VERBOSE": "maybe"}, "environment WGJIT_VERBOSE"),
    ({"gateway": 3}, {}, "'gateway': must be a table"),
])
def test_errors_name_the_key(file, env, needle):
    file.setdefault("registry", "http://x") if isinstance(file.get("gateway"), dict) else None
    with pytest.raises(ConfigError) as e:
        config.resolve(OPTS, {}, file, "gateway", env)
    assert needle in str(e.value)


def test_missing_required_says_how_to_give_it():
    with pytest.raises(ConfigError, match="--registry, WGJIT_REGISTRY"):
        config.resolve(OPTS, {}, {}, "gateway", {})


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[gateway\nregistry = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.read_config_file(p)
    with pytest.raises(ConfigError, match="not found"):
        config.read_config_file(tmp_path / "missing.toml")


def test_secret_files(tmp_path):
    p = write_secret(tmp_path / "sub" / "token", "s3cret")
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert read_secret(p) == "s3cret"
    p.chmod(0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret(p)
    empty = write_secret(tmp_path / "empty", "")
    with pytest.raises(SecretFileError, match="empty"):
        read_secret(empty)
