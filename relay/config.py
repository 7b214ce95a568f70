"""Configuration: ``PGWS_*`` environment variables → one frozen :class:`Config`.

Theory of operation
-------------------
Every setting lives in the table :data:`SETTINGS`: its variable name, its default, the parser
that turns the text into a value and the line ``--help`` prints. The command line and the
environment are both just sources of text for that table; :func:`load` applies the parsers in
one pass and returns a :class:`Config`, or raises :class:`ConfigError` naming the first
variable that is missing or does not parse.

Rules this module keeps:

- The upstream variables (postgres-websockets, section 1 of the spec) keep their names,
  defaults and units, including the millisecond ``PGWS_CHECK_LISTENER_INTERVAL``.
- ``@file`` loading: ``PGWS_DB_URI=@path`` is the file's text stripped of surrounding white
  space; ``PGWS_JWT_SECRET=@path`` is the file's bytes with one trailing ``\\n`` removed.
- Settings this project adds are seconds (a float is fine) or bytes, and say so in their help.
- It reads the ``@file`` values and nothing else: no sockets, no logging. The DB URI is parsed
  (not connected to) so that a typo is a start-up error naming ``PGWS_DB_URI``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

#: The NOTIFY payload limit of a default PostgreSQL build (``NAMEDATALEN``-style compile-time
#: constant): payloads must be shorter than this many bytes.
PG_NOTIFY_MAX_BYTES = 8000

#: PostgreSQL truncates identifiers to 63 bytes; a longer listen channel would LISTEN on a
#: truncated name while ``pg_notify`` refuses the long one, so every client write would fail.
_PG_IDENTIFIER_MAX_BYTES = 63

#: Heartbeat period when ``PGWS_CHECK_LISTENER_INTERVAL`` is unset: a half-open listener is
#: noticed within a few seconds, at the cost of one tiny NOTIFY per period.
_DEFAULT_HEARTBEAT_MS = 5000


class ConfigError(Exception):
    """A setting is missing or does not parse; ``str()`` is the one line to print."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the relay needs to know, parsed and checked."""

    db_uri: str
    jwt_secret: bytes
    host: str
    port: int
    root_path: str | None
    listen_channel: str
    meta_channel: str | None
    pool_size: int
    retries: int
    #: Seconds between listener heartbeats; 0 disables the heartbeat.
    heartbeat_interval: float
    certificate_file: str | None
    key_file: str | None
    max_queue_bytes: int
    send_buffer: int
    send_timeout: float
    close_timeout: float
    handshake_timeout: float
    ping_interval: float
    max_message_size: int
    max_connections: int
    max_connections_per_ip: int
    max_writes_per_second: float
    max_client_frames_per_second: float
    max_client_bytes_per_second: float
    allowed_origins: tuple[str, ...]
    shutdown_timeout: float
    log_level: str
    log_format: str
    workers: int
    admin_host: str
    admin_port: int | None

    @property
    def tls(self) -> bool:
        return self.certificate_file is not None


# -- parsers: text → value, raising ValueError with a message for the user ---------------------

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _text(value: str) -> str:
    return value


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _conninfo(value: str) -> str:
    try:
        conninfo_to_dict(_nonempty(value))
    except psycopg.ProgrammingError:
        # psycopg's message may quote the string, password included: say less.
        raise ValueError("not a valid libpq connection string or URI") from None
    return value


def _bool(value: str) -> bool:
    # Upstream accepts exactly "True"/"False" (Haskell `read`); the usual spellings are a
    # deliberate extension, so existing deployments keep working and new ones are not surprised.
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected True or False, got {value!r}")


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"expected an integer {bound}, got {number}")
        return number

    return parse


def _seconds(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _rate(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"expected a number per second, got {value!r}") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"expected a number per second >= 0, got {value!r}")
    return number


def _channel(value: str) -> str:
    if len(value.encode()) > _PG_IDENTIFIER_MAX_BYTES:
        raise ValueError(f"longer than {_PG_IDENTIFIER_MAX_BYTES} bytes, PostgreSQL's limit")
    return _nonempty(value)


def _origins(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _log_format(value: str) -> str:
    form = value.strip().lower()
    if form not in {"text", "json"}:
        raise ValueError(f"expected text or json, got {value!r}")
    return form


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return level


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``PGWS_*`` variable: where it goes in :class:`Config` and how it parses."""

    variable: str
    field: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.variable.removeprefix("PGWS_").lower().replace("_", "-")


#: The settings, in the order ``--help`` lists them. ``default=None`` means unset.
SETTINGS: tuple[Setting, ...] = (
    Setting("PGWS_DB_URI", "db_uri", _conninfo, None,
            "libpq connection string or URI; @path reads it from a file", required=True),
    Setting("PGWS_JWT_SECRET", "jwt_secret", _text, None,
            "HMAC secret, JWK or JWK Set; @path reads it from a file", required=True),
    Setting("PGWS_JWT_SECRET_BASE64", "jwt_secret_base64", _bool, "False",
            "the secret is base64 (True/False)"),
    Setting("PGWS_HOST", "host", _nonempty, "*4",
            "bind address: *4 / !4 IPv4 any, * / *6 any, !6 IPv6 only, or a host name/IP"),
    Setting("PGWS_PORT", "port", _int_at_least(0, 65535), "3000", "TCP port (0: any free port)"),
    Setting("PGWS_ROOT_PATH", "root_path", _text, None,
            "directory of static files for plain HTTP (unset: 'Hello, Web!')"),
    Setting("PGWS_LISTEN_CHANNEL", "listen_channel", _channel, "postgres-websockets-listener",
            "the one PostgreSQL channel to LISTEN and NOTIFY on"),
    Setting("PGWS_META_CHANNEL", "meta_channel", _text, None,
            "WebSocket channel for ConnectionOpen/ConnectionClose/ListenerReconnected events "
            "(unset: off)"),
    Setting("PGWS_POOL_SIZE", "pool_size", _int_at_least(1), "10",
            "connections for NOTIFYs (client writes, meta events, heartbeats)"),
    Setting("PGWS_RETRIES", "retries", _int_at_least(0), "5",
            "how long the listener may stay disconnected: as long as upstream's N attempts "
            "with backoff 1, 2, 4 … 32 s span (5: 15 s), retrying every second; then exit 1"),
    Setting("PGWS_CHECK_LISTENER_INTERVAL", "check_listener_interval", _int_at_least(0), None,
            f"listener heartbeat period in milliseconds; 0: off (unset: {_DEFAULT_HEARTBEAT_MS})"),
    Setting("PGWS_CERTIFICATE_FILE", "certificate_file", _nonempty, None,
            "PEM certificate; with PGWS_KEY_FILE serves wss:// and https://"),
    Setting("PGWS_KEY_FILE", "key_file", _nonempty, None, "PEM private key"),
    Setting("PGWS_MAX_QUEUE_BYTES", "max_queue_bytes", _int_at_least(1024), "1048576",
            "bytes queued for one client before it is closed as a slow consumer (1013)"),
    Setting("PGWS_SEND_BUFFER", "send_buffer", _int_at_least(0), "262144",
            "SO_SNDBUF per client socket in bytes, bounding kernel memory per client "
            "(0: the kernel's autotuning, up to several MiB per client)"),
    Setting("PGWS_SEND_TIMEOUT", "send_timeout", _seconds, "10",
            "seconds a client's socket may accept nothing (under TLS: not one 16 KiB record) "
            "before it is closed (1013); also bounds each write of a plain HTTP answer"),
    Setting("PGWS_CLOSE_TIMEOUT", "close_timeout", _seconds, "5",
            "seconds to finish a close handshake before the TCP connection is aborted"),
    Setting("PGWS_HANDSHAKE_TIMEOUT", "handshake_timeout", _seconds, "10",
            "seconds a connection has to send each HTTP request, head and body (the first, and "
            "the next on a kept-alive connection)"),
    Setting("PGWS_PING_INTERVAL", "ping_interval", _seconds, "30",
            "seconds between server pings to every client"),
    Setting("PGWS_MAX_MESSAGE_SIZE", "max_message_size", _int_at_least(1),
            str(PG_NOTIFY_MAX_BYTES),
            "largest client message in bytes; bigger ones close the connection (1009)"),
    Setting("PGWS_MAX_CONNECTIONS", "max_connections", _int_at_least(0), "0",
            "WebSocket connections at most; more get HTTP 503 (0: no limit)"),
    Setting("PGWS_MAX_CONNECTIONS_PER_IP", "max_connections_per_ip", _int_at_least(0), "0",
            "open connections from one client address (IPv6: one /64) at most, per worker; more "
            "get HTTP 503 without their request being parsed (0: no limit)"),
    Setting("PGWS_MAX_WRITES_PER_SECOND", "max_writes_per_second", _rate, "0",
            "messages per second one client may write (bursts up to one second's worth, at "
            "least 1); faster writers are closed with 1008 (0: no limit)"),
    Setting("PGWS_MAX_CLIENT_FRAMES_PER_SECOND", "max_client_frames_per_second", _rate, "1000",
            "WebSocket frames per second one client may send, of any kind (bursts up to one "
            "second's worth); more close it with 1008 (0: no limit)"),
    Setting("PGWS_MAX_CLIENT_BYTES_PER_SECOND", "max_client_bytes_per_second", _rate,
            "1048576",
            "bytes per second one client may send (bursts up to one second's worth, at least two "
            "of the largest messages); more close it with 1008 (0: no limit)"),
    Setting("PGWS_ALLOWED_ORIGINS", "allowed_origins", _origins, None,
            "comma-separated Origin values allowed to connect (unset: any)"),
    Setting("PGWS_SHUTDOWN_TIMEOUT", "shutdown_timeout", _seconds, "5",
            "seconds from SIGTERM/SIGINT to exit: every client gets close 1001, those that "
            "have not answered in time are reset"),
    Setting("PGWS_LOG_LEVEL", "log_level", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("PGWS_LOG_FORMAT", "log_format", _log_format, "text",
            "text (one readable line per event) or json (one JSON object per line)"),
    Setting("PGWS_WORKERS", "workers", _int_at_least(1, 256), "1",
            "worker processes sharing the port (SO_REUSEPORT), each with its own LISTEN"),
    Setting("PGWS_ADMIN_HOST", "admin_host", _nonempty, "127.0.0.1",
            "address of the admin listener (/health, /ready, /metrics)"),
    Setting("PGWS_ADMIN_PORT", "admin_port", _int_at_least(0, 65535), None,
            "TCP port of the admin listener (unset: no admin listener)"),
)


def _read_file(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path!r}: {exc.strerror}") from None


def _decode_base64_secret(secret: bytes) -> bytes:
    # Upstream substitutes the URL-safe alphabet (and '.' for padding) before a strict decode.
    text = secret.strip().translate(bytes.maketrans(b"-_.", b"+/="))
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ConfigError("PGWS_JWT_SECRET", f"not valid base64: {exc}") from None


def load(env: Mapping[str, str]) -> Config:
    """Parse the ``PGWS_*`` variables in ``env``; raise :class:`ConfigError` on the first problem.

    Reads the files named by ``@path`` values; nothing else touches the outside world.
    """
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = env.get(setting.variable, setting.default)
        if text is None:
            if setting.required:
                raise ConfigError(setting.variable, "required but not set")
            values[setting.field] = None
            continue
        if setting.variable == "PGWS_DB_URI" and text.startswith("@"):
            text = _read_file(setting.variable, text[1:]).decode("utf-8", "replace").strip()
        try:
            values[setting.field] = setting.parse(text)
        except ValueError as exc:
            raise ConfigError(setting.variable, str(exc)) from None

    secret_text: str = values.pop("jwt_secret")
    if secret_text.startswith("@"):
        secret = _read_file("PGWS_JWT_SECRET", secret_text[1:]).removesuffix(b"\n")
    else:
        secret = secret_text.encode()
    if values.pop("jwt_secret_base64"):
        secret = _decode_base64_secret(secret)
    values["jwt_secret"] = secret

    if (values["certificate_file"] is None) != (values["key_file"] is None):
        raise ConfigError("PGWS_CERTIFICATE_FILE",
                          "PGWS_CERTIFICATE_FILE and PGWS_KEY_FILE must be set together")

    if values["workers"] > 1 and values["port"] == 0:
        raise ConfigError("PGWS_WORKERS", "several workers need a fixed PGWS_PORT, not 0")

    interval_ms = values.pop("check_listener_interval")
    if interval_ms is None:
        interval_ms = _DEFAULT_HEARTBEAT_MS
    values["heartbeat_interval"] = interval_ms / 1000
    values["allowed_origins"] = values["allowed_origins"] or ()
    # An empty value means "unset" for these two, as a user who wrote VAR= would expect.
    values["meta_channel"] = values["meta_channel"] or None
    values["root_path"] = values["root_path"] or None
    return Config(**values)
