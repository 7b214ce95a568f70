"""PGWS_* variables → Config (spec section 1), and the command's exit status 2."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from relay.config import SETTINGS, ConfigError, load
from tests.conftest import RELAY, relay_env

BASE = {"PGWS_DB_URI": "postgres://u@h/db", "PGWS_JWT_SECRET": "s" * 32}


def test_defaults_match_upstream() -> None:
    config = load(BASE)
    assert config.host == "*4"
    assert config.port == 3000
    assert config.root_path is None
    assert config.listen_channel == "postgres-websockets-listener"
    assert config.meta_channel is None
    assert config.pool_size == 10
    assert config.retries == 5
    assert config.jwt_secret == b"s" * 32
    assert config.tls is False


def test_defaults_of_the_limits_this_project_adds() -> None:
    config = load(BASE)
    assert (config.max_client_frames_per_second, config.max_client_bytes_per_second) == (
        1000, 1 << 20)
    assert (config.handshake_timeout, config.send_timeout, config.close_timeout) == (10, 10, 5)
    assert (config.max_queue_bytes, config.max_message_size) == (1 << 20, 8000)
    assert (config.max_connections, config.max_connections_per_ip) == (0, 0)


@pytest.mark.parametrize("missing", ["PGWS_DB_URI", "PGWS_JWT_SECRET"])
def test_required(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        load(env)
    assert info.value.variable == missing
    assert str(info.value).startswith(f"{missing}: ")


def test_empty_db_uri_is_an_error() -> None:
    with pytest.raises(ConfigError, match="PGWS_DB_URI"):
        load({**BASE, "PGWS_DB_URI": ""})


def test_unparsable_db_uri_is_an_error_that_does_not_repeat_it() -> None:
    with pytest.raises(ConfigError) as info:
        load({**BASE, "PGWS_DB_URI": "host=x password=hunter2 oops"})
    assert str(info.value) == "PGWS_DB_URI: not a valid libpq connection string or URI"


@pytest.mark.parametrize("variable,value", [
    ("PGWS_PORT", "abc"), ("PGWS_PORT", "70000"), ("PGWS_POOL_SIZE", "0"),
    ("PGWS_RETRIES", "-1"), ("PGWS_CHECK_LISTENER_INTERVAL", "1.5"),
    ("PGWS_JWT_SECRET_BASE64", "maybe"), ("PGWS_SEND_TIMEOUT", "0"),
    ("PGWS_LISTEN_CHANNEL", "x" * 64), ("PGWS_LOG_LEVEL", "LOUD"),
])
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({**BASE, variable: value})
    assert info.value.variable == variable
    assert "\n" not in str(info.value)


def test_file_loading(tmp_path: Path) -> None:
    (tmp_path / "uri").write_text("  postgres://u@h/db \n")
    (tmp_path / "secret").write_bytes(b"secret-from-file\n\n")
    config = load({"PGWS_DB_URI": f"@{tmp_path / 'uri'}",
                   "PGWS_JWT_SECRET": f"@{tmp_path / 'secret'}"})
    assert config.db_uri == "postgres://u@h/db"
    assert config.jwt_secret == b"secret-from-file\n"  # one trailing newline removed, only one


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PGWS_JWT_SECRET: cannot read"):
        load({**BASE, "PGWS_JWT_SECRET": f"@{tmp_path / 'nope'}"})


@pytest.mark.parametrize("flag", ["True", "true", "1", "yes"])
def test_base64_secret(flag: str) -> None:
    raw = bytes(range(40))
    encoded = base64.urlsafe_b64encode(raw).decode().replace("=", ".")
    config = load({**BASE, "PGWS_JWT_SECRET": encoded, "PGWS_JWT_SECRET_BASE64": flag})
    assert config.jwt_secret == raw


def test_bad_base64_secret() -> None:
    with pytest.raises(ConfigError, match="PGWS_JWT_SECRET: not valid base64"):
        load({**BASE, "PGWS_JWT_SECRET": "abc", "PGWS_JWT_SECRET_BASE64": "True"})


def test_check_listener_interval_is_milliseconds_and_zero_is_off() -> None:
    assert load({**BASE, "PGWS_CHECK_LISTENER_INTERVAL": "1000"}).heartbeat_interval == 1.0
    assert load({**BASE, "PGWS_CHECK_LISTENER_INTERVAL": "0"}).heartbeat_interval == 0
    assert load(BASE).heartbeat_interval == 5.0


def test_tls_files_must_come_together() -> None:
    with pytest.raises(ConfigError, match="must be set together"):
        load({**BASE, "PGWS_CERTIFICATE_FILE": "cert.pem"})


def test_every_setting_has_a_flag_and_help() -> None:
    flags = [setting.flag for setting in SETTINGS]
    assert len(set(flags)) == len(flags)
    assert all(setting.help for setting in SETTINGS)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RELAY, *args], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_command_exits_2_with_one_line_naming_the_variable() -> None:
    result = _run(relay_env(PGWS_PORT="not-a-port"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pgws-relay: PGWS_PORT: expected an integer, got 'not-a-port'"]
    assert "Traceback" not in result.stderr


def test_missing_secret_exits_2() -> None:
    env = relay_env()
    del env["PGWS_JWT_SECRET"]
    result = _run(env)
    assert (result.returncode, result.stderr.strip()) == (
        2, "pgws-relay: PGWS_JWT_SECRET: required but not set")


def test_help_lists_every_variable() -> None:
    result = _run(relay_env(), "--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.variable in result.stdout


def test_flag_overrides_environment() -> None:
    result = _run(relay_env(PGWS_PORT="3000"), "--port", "nope")
    assert result.returncode == 2
    assert "PGWS_PORT" in result.stderr


def test_the_readme_lists_every_setting_as_the_code_has_it() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for setting in SETTINGS:
        default = "required" if setting.required else (
            "unset" if setting.default is None else f"`{setting.default}`")
        row = f"| `{setting.variable}` | `{setting.flag}` | {default} | {setting.help} |"
        assert row in readme, setting.variable
