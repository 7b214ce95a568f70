"""Configuration: ``PGWS_*`` environment variables → one frozen :class:`Config`.

Theory of operation
-------------------
Every setting lives in the table :data:`SETTINGS`: its variable name, its default, the parser
that turns the text into a value and the line ``--help`` prints. The command line and the
environment are both just sources of text for that table; :func:`load` applies the parsers in
one pass and returns a :class:`Config`, or raises one :class:`ConfigError` listing every
variable that is missing or does not parse (an operator fixes them all in one round, not one
per restart). :func:`load_secret` is the part that reads ``PGWS_JWT_SECRET`` and
``PGWS_JWT_SECRET_BASE64`` alone, for the ``token`` command, which needs nothing else.

Rules this module keeps:

- The upstream variables (postgres-websockets' Config.hs) keep their names,
  defaults and units, including the millisecond ``PGWS_CHECK_LISTENER_INTERVAL``.
- ``@file`` loading: ``PGWS_DB_URI=@path`` is the file's text stripped of surrounding white
  space; ``PGWS_JWT_SECRET=@path`` is the file's bytes with one trailing ``\\n`` removed.
- Settings this project adds are seconds (a float is fine) or bytes, and say so in their help.
- A problem is one line naming one variable, in the order of :data:`SETTINGS`; it never
  repeats a secret or a password.
- It reads the ``@file`` values and looks at ``PGWS_ROOT_PATH`` (a readable directory, or a
  start-up error rather than a 404 for every request); nothing else: no sockets, no logging.
  The DB URI is parsed (not connected to) so that a typo is a start-up error naming
  ``PGWS_DB_URI``. What a secret means (keys, HMAC lengths) is :mod:`relay.auth.tokens`'s business,
  checked by the command.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.wire.origins import origin_key
from relay.wire.positions import MIN_KEY_BYTES as MIN_POSITION_KEY_BYTES

#: The NOTIFY payload limit of a default PostgreSQL build (``NAMEDATALEN``-style compile-time
#: constant): payloads must be shorter than this many bytes.
PG_NOTIFY_MAX_BYTES = 8000

#: PostgreSQL truncates identifiers to 63 bytes; a longer listen channel would LISTEN on a
#: truncated name while ``pg_notify`` refuses the long one, so every client write would fail.
_PG_IDENTIFIER_MAX_BYTES = 63

#: ``PGWS_SOURCE``'s values: LISTEN/NOTIFY (upstream's), or the write-ahead log.
SOURCES = ("notify", "wal", "nats")

#: PostgreSQL's rule for replication slot names.
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")

#: What a positioned delivery adds to its payload in a client's queue: a WebSocket header
#: (10 bytes at most), the position (51) and a line feed.
DELIVERY_OVERHEAD = 62

#: Heartbeat period when ``PGWS_CHECK_LISTENER_INTERVAL`` is unset: a half-open listener is
#: noticed within a few seconds, at the cost of one tiny NOTIFY per period.
_DEFAULT_HEARTBEAT_MS = 5000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One variable that is missing or wrong; ``str()`` is the line to print."""

    variable: str
    problem: str

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}"


class ConfigError(Exception):
    """Settings that are missing or do not parse: :attr:`problems`, one line each.

    :attr:`variable` names the first problem's variable, and ``str()`` joins every line with
    ``"; "`` (still one line), so callers that expect a single problem keep working.
    """

    def __init__(self, variable: str, problem: str, *more: Problem) -> None:
        self.problems: tuple[Problem, ...] = (Problem(variable, problem), *more)
        self.variable = variable
        super().__init__("; ".join(map(str, self.problems)))

    @classmethod
    def of(cls, problems: Iterable[Problem]) -> ConfigError:
        """One error for ``problems`` (at least one), in the order of :data:`SETTINGS`."""
        first, *rest = sorted(problems, key=_settings_order)
        return cls(first.variable, first.problem, *rest)


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
    source: str
    wal_slot: str | None
    wal_publication: str
    max_payload_bytes: int
    nats_servers: tuple[str, ...]
    nats_stream: str
    nats_user: str | None
    nats_password: str | None
    nats_token: str | None
    nats_creds: str | None
    nats_tls_ca: str | None
    nats_replicas: int
    nats_max_age: float
    nats_max_bytes: int
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
    token_cookie: str
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    position_key: bytes | None
    position_key_previous: bytes | None
    shutdown_timeout: float
    log_level: str
    log_format: str
    workers: int
    admin_host: str
    admin_port: int | None
    compression: bool
    compression_streams: int
    max_filter_sets: int
    max_filter_cost: int
    max_filter_sets_per_ip: int
    max_resumes_per_second_per_ip: float
    history_messages: int
    history_bytes: int
    history_seconds: float

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


def _source(value: str) -> str:
    source = value.strip().lower()
    if source not in SOURCES:
        raise ValueError(f"expected notify, wal or nats, got {value!r}")
    return source


def slot_name(value: str) -> str:
    """A name PostgreSQL takes for a replication slot (and, here, a publication) as it is."""
    if not _SLOT_NAME.fullmatch(value):
        raise ValueError(f"{value!r}: use 1 to 63 lower-case letters, digits and underscores "
                         "(PostgreSQL's rule for slot names)")
    return value


def _slot_name_or_unset(value: str) -> str:
    return slot_name(value) if value else ""  # VAR= means unset, as elsewhere.


def _servers(value: str) -> tuple[str, ...]:
    servers = []
    for item in (item.strip() for item in value.split(",")):
        if not item:
            continue
        if "@" in item:  # Said without the item: it would hold a password.
            raise ValueError("credentials in a server URL are not taken (they would reach the "
                             "logs): use PGWS_NATS_USER and PGWS_NATS_PASSWORD, PGWS_NATS_TOKEN "
                             "or PGWS_NATS_CREDS")
        if not re.fullmatch(r"(nats|tls)://[^\s/]+", item):
            raise ValueError(f"{item!r} is not a NATS server URL (nats://host:port or "
                             "tls://host:port)")
        servers.append(item)
    return tuple(servers)


def _readable_file(value: str) -> str:
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {value!r}: {exc.strerror}") from None
    return value


def _stream_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(f"{value!r}: use 1 to 64 letters, digits, '_' and '-' (the stream's "
                         "name is also its subjects' first token)")
    return value


def _origins(value: str) -> tuple[str, ...]:
    origins = []
    for item in (item.strip() for item in value.split(",")):
        if not item:
            continue
        key = origin_key(item.removesuffix("/"))  # A pasted URL's slash; a header has none.
        if key is None:
            raise ValueError(f"{item!r} is not an origin (scheme://host or scheme://host:port)")
        origins.append(key)
    return tuple(origins)


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in (item.strip() for item in value.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a network (CIDR)") from None
        if network.prefixlen == 0:
            raise ValueError(f"{item!r} trusts every address: whoever connects could claim to "
                             "be any client; name the balancers' addresses")
        networks.append(network)
    return tuple(networks)


def _position_key(value: str) -> bytes:
    key = value.encode()
    if len(key) < MIN_POSITION_KEY_BYTES:
        raise ValueError(f"{len(key)} bytes; a position key needs at least "
                         f"{MIN_POSITION_KEY_BYTES} (32 random bytes as hex: "
                         "openssl rand -hex 32)")
    return key


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
            "HMAC secret (at least 32 bytes), JWK or JWK Set; @path reads it from a file",
            required=True),
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
    Setting("PGWS_SOURCE", "source", _source, "notify",
            "where notifications come from: notify (LISTEN on PGWS_LISTEN_CHANNEL) or wal "
            "(pg_logical_emit_message with that prefix, read from the write-ahead log through "
            "PGWS_WAL_SLOT; needs wal_level = logical)"),
    Setting("PGWS_WAL_SLOT", "wal_slot", _slot_name_or_unset, None,
            "the logical replication slot this relay reads (PGWS_SOURCE=wal: required, one per "
            "relay process; made when missing and kept: drop it with pgws-relay drop-slot)"),
    Setting("PGWS_WAL_PUBLICATION", "wal_publication", slot_name, "pgws_relay",
            "the publication the slot reads through (made when missing; it publishes no "
            "table)"),
    Setting("PGWS_MAX_PAYLOAD_BYTES", "max_payload_bytes", _int_at_least(1), "1000000",
            "largest payload delivered with PGWS_SOURCE=wal (a larger one is counted, logged, "
            "and positioned clients are told lost); PGWS_MAX_QUEUE_BYTES must hold one"),
    Setting("PGWS_NATS_URL", "nats_servers", _servers, None,
            "NATS servers, comma-separated (nats://host:4222, tls://host:4222): the stream "
            "PGWS_SOURCE=nats reads and pgws-relay feed fills"),
    Setting("PGWS_NATS_STREAM", "nats_stream", _stream_name, "pgws",
            "the JetStream stream (made by pgws-relay feed when missing; its subjects are "
            "STREAM.CHANNEL)"),
    Setting("PGWS_NATS_USER", "nats_user", _text, None, "NATS user (with PGWS_NATS_PASSWORD)"),
    Setting("PGWS_NATS_PASSWORD", "nats_password", _text, None, "NATS password"),
    Setting("PGWS_NATS_TOKEN", "nats_token", _text, None, "NATS token"),
    Setting("PGWS_NATS_CREDS", "nats_creds", _readable_file, None,
            "a NATS credentials file (JWT and NKey seed)"),
    Setting("PGWS_NATS_TLS_CA", "nats_tls_ca", _readable_file, None,
            "CA certificates (PEM) to verify the NATS servers with (tls:// URLs)"),
    Setting("PGWS_NATS_REPLICAS", "nats_replicas", _int_at_least(0, 5), "0",
            "replicas of a stream the feeder makes (0: 1 on a single server, 3 in a cluster)"),
    Setting("PGWS_NATS_MAX_AGE", "nats_max_age", _seconds, "86400",
            "seconds a stream the feeder makes keeps a message (what a resume can reach)"),
    Setting("PGWS_NATS_MAX_BYTES", "nats_max_bytes", _int_at_least(1 << 20), "1073741824",
            "bytes a stream the feeder makes keeps at most (the oldest go first)"),
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
            "comma-separated origins (scheme://host[:port]) allowed to connect, compared as "
            "origins: scheme and host in any case, a default port or none (unset: any)"),
    Setting("PGWS_TOKEN_COOKIE", "token_cookie", _nonempty, "pgws_token",
            "the cookie that may carry the token (WebSocket and event streams), taken only "
            "with PGWS_ALLOWED_ORIGINS and from an allowed Origin"),
    Setting("PGWS_POSITION_KEY", "position_key", _position_key, None,
            "the secret that seals resume positions, the same on every relay of a fleet "
            "(@file reads it from a file; unset: derived from an HMAC PGWS_JWT_SECRET, else a "
            "random key per relay, with a warning)"),
    Setting("PGWS_POSITION_KEY_PREVIOUS", "position_key_previous", _position_key, None,
            "the key PGWS_POSITION_KEY replaced: positions sealed with it still resume, during a "
            "rotation (@file reads it from a file)"),
    Setting("PGWS_PROXY_PROTOCOL_FROM", "proxy_protocol_from", _networks, None,
            "comma-separated addresses or networks (CIDR) of balancers that send the PROXY "
            "protocol v2 (HAProxy's send-proxy-v2): their connections must begin with it, and "
            "the client address it carries is the one per-address limits count (unset: none)"),
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
    Setting("PGWS_MAX_FILTER_SETS", "max_filter_sets", _int_at_least(0), "1000",
            "distinct filter sets on one channel at most, counted apart for sets with a "
            "token's filters claim and for URL filters alone; a connection that would add one "
            "more gets HTTP 503 (0: no limit)"),
    Setting("PGWS_MAX_FILTER_COST", "max_filter_cost", _int_at_least(0), "10000",
            "what evaluating one channel's distinct filter sets may cost per notification, in "
            "units of about 0.3 µs (4 per filter plus 1 per path segment; an eq filter the index "
            "answers is free), counted apart for claim and URL-only sets; a connection that "
            "would pass it gets HTTP 503 (0: no limit)"),
    Setting("PGWS_MAX_FILTER_SETS_PER_IP", "max_filter_sets_per_ip", _int_at_least(0), "64",
            "distinct URL-only filter sets that connections from one client address (IPv6: one "
            "/64) hold at most, over all channels, per worker; more get HTTP 503 (0: no "
            "limit)"),
    Setting("PGWS_MAX_RESUMES_PER_SECOND_PER_IP", "max_resumes_per_second_per_ip", _rate, "10",
            "resumes (from=) one client address (IPv6: one /64) may start per second, per "
            "worker, in bursts of twice that; more get HTTP 429 and retry (each replay is "
            "bounded in work too; 0: no limit)"),
    Setting("PGWS_COMPRESSION", "compression", _bool, "True",
            "permessage-deflate with clients that offer it, one compressor per stream of "
            "identical deliveries (True/False)"),
    Setting("PGWS_COMPRESSION_STREAMS", "compression_streams", _int_at_least(0), "1024",
            "streams that keep a shared compressor (~150 KiB each); beyond, each message is "
            "compressed on its own (0: always)"),
    Setting("PGWS_HISTORY_MESSAGES", "history_messages", _int_at_least(0), "1000",
            "deliveries kept per channel for clients that resume (subprotocol "
            "pgws.resume.v1; 0: history off, no positions)"),
    Setting("PGWS_HISTORY_BYTES", "history_bytes", _int_at_least(65536), "134217728",
            "memory of the history, all channels together, counting each delivery as its "
            "payload and position plus 512 bytes; the oldest go first"),
    Setting("PGWS_HISTORY_SECONDS", "history_seconds", _seconds, "300",
            "seconds a delivery is kept for clients that resume"),
)


#: Where each variable comes in :data:`SETTINGS`: problems are reported in that order.
_ORDER = {setting.variable: index for index, setting in enumerate(SETTINGS)}

#: The settings :func:`load_secret` reads; :func:`load` leaves them to it.
SECRET_VARIABLES = frozenset({"PGWS_JWT_SECRET", "PGWS_JWT_SECRET_BASE64"})


def _settings_order(problem: Problem) -> int:
    return _ORDER.get(problem.variable, len(_ORDER))


#: Settings whose ``@path`` value is read from that file (secrets stay out of the environment).
_FILE_VARIABLES = frozenset({"PGWS_DB_URI", "PGWS_POSITION_KEY", "PGWS_POSITION_KEY_PREVIOUS",
                             "PGWS_NATS_PASSWORD", "PGWS_NATS_TOKEN"})


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


def _value(setting: Setting, env: Mapping[str, str]) -> Any:
    """The parsed value of one setting (None: unset), or :class:`ConfigError` naming it."""
    text = env.get(setting.variable, setting.default)
    if text is None:
        if setting.required:
            raise ConfigError(setting.variable, "required but not set")
        return None
    if setting.variable in _FILE_VARIABLES and text.startswith("@"):
        text = _read_file(setting.variable, text[1:]).decode("utf-8", "replace").strip()
    try:
        return setting.parse(text)
    except ValueError as exc:
        raise ConfigError(setting.variable, str(exc)) from None


def _setting(variable: str) -> Setting:
    return SETTINGS[_ORDER[variable]]


def read_setting(variable: str, env: Mapping[str, str]) -> Any:
    """One setting's value (None: unset), ``@file`` read and parsed as :func:`load` does;
    :class:`ConfigError` naming it (never its secret text)."""
    return _value(_setting(variable), env)


def load_secret(env: Mapping[str, str]) -> bytes:
    """The secret bytes of ``PGWS_JWT_SECRET`` after ``@file`` and base64 handling.

    :class:`ConfigError` lists the problems of both secret variables. Nothing is said about
    what the bytes mean: :func:`relay.auth.tokens.read_secret` decides that.
    """
    problems: list[Problem] = []
    text: str | None = None
    is_base64 = False
    try:
        text = _value(_setting("PGWS_JWT_SECRET"), env)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        is_base64 = _value(_setting("PGWS_JWT_SECRET_BASE64"), env)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or text is None:
        raise ConfigError.of(problems)
    if text.startswith("@"):
        secret = _read_file("PGWS_JWT_SECRET", text[1:]).removesuffix(b"\n")
    else:
        secret = text.encode()
    return _decode_base64_secret(secret) if is_base64 else secret


def _check_directory(path: str) -> None:
    """Raise ValueError unless ``path`` is a directory the relay can list and read files in."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path!r} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path.
        why = exc.strerror if isinstance(exc, OSError) else "not a valid path"
        raise ValueError(f"cannot use {path!r}: {why}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path!r} is not a directory")
    # Listing needs read, opening a file inside needs search (x): without either, every
    # request would get a 404 and the operator would see no reason why.
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"cannot use {path!r}: permission denied (the directory must be "
                         "readable and searchable)")


def load(env: Mapping[str, str], secret: bool = True) -> Config:
    """Parse the ``PGWS_*`` variables in ``env``; raise one :class:`ConfigError` listing every
    problem.

    Reads the files named by ``@path`` values and checks ``PGWS_ROOT_PATH``; nothing else
    touches the outside world. A check that combines two settings is made only when both
    parsed, so that each line points at a real mistake.
    """
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.variable in SECRET_VARIABLES:
            continue
        try:
            values[setting.field] = _value(setting, env)
        except ConfigError as exc:
            problems.extend(exc.problems)
    try:
        # ``secret=False``: a command that verifies no token (``feed``) does without one.
        values["jwt_secret"] = load_secret(env) if secret else b""
    except ConfigError as exc:
        problems.extend(exc.problems)

    def parsed(*fields: str) -> bool:
        return all(field in values for field in fields)

    if parsed("certificate_file", "key_file") and \
            (values["certificate_file"] is None) != (values["key_file"] is None):
        problems.append(Problem("PGWS_CERTIFICATE_FILE",
                                "PGWS_CERTIFICATE_FILE and PGWS_KEY_FILE must be set together"))
    if parsed("position_key", "position_key_previous") and values["position_key"] is None \
            and values["position_key_previous"] is not None:
        problems.append(Problem("PGWS_POSITION_KEY_PREVIOUS",
                                "set with PGWS_POSITION_KEY, the key that replaced it"))
    if parsed("source", "wal_slot") and values["source"] == "wal" and not values["wal_slot"]:
        problems.append(Problem("PGWS_WAL_SLOT", "required with PGWS_SOURCE=wal: name the "
                                "replication slot this relay reads (one per relay process)"))
    if parsed("source", "nats_servers") and values["source"] == "nats" \
            and not values["nats_servers"]:
        problems.append(Problem("PGWS_NATS_URL", "required with PGWS_SOURCE=nats: the NATS "
                                "servers whose stream the relay reads"))
    if parsed("nats_user", "nats_password") and \
            (values["nats_user"] is None) != (values["nats_password"] is None):
        problems.append(Problem("PGWS_NATS_PASSWORD", "PGWS_NATS_USER and PGWS_NATS_PASSWORD "
                                "must be set together"))
    if parsed("source", "workers") and values["source"] == "wal" and values["workers"] > 1:
        problems.append(Problem("PGWS_WORKERS", "PGWS_SOURCE=wal reads one slot per process: "
                                "run one worker per relay process (PGWS_WORKERS=1)"))
    if parsed("source", "max_payload_bytes", "max_queue_bytes") and values["source"] != "notify" \
            and values["max_queue_bytes"] < values["max_payload_bytes"] + DELIVERY_OVERHEAD:
        problems.append(Problem(
            "PGWS_MAX_PAYLOAD_BYTES", f"{values['max_payload_bytes']} bytes do not fit in a "
            f"client's queue (PGWS_MAX_QUEUE_BYTES {values['max_queue_bytes']}): every client "
            f"would be closed as slow; raise PGWS_MAX_QUEUE_BYTES to at least "
            f"{values['max_payload_bytes'] + DELIVERY_OVERHEAD}"))
    if parsed("workers", "port") and values["workers"] > 1 and values["port"] == 0:
        problems.append(Problem("PGWS_WORKERS", "several workers need a fixed PGWS_PORT, not 0"))
    # An empty value means "unset" for these two, as a user who wrote VAR= would expect.
    if parsed("root_path") and values["root_path"]:
        try:
            _check_directory(values["root_path"])
        except ValueError as exc:
            problems.append(Problem("PGWS_ROOT_PATH", str(exc)))
    if problems:
        raise ConfigError.of(problems)

    interval_ms = values.pop("check_listener_interval")
    if interval_ms is None:
        interval_ms = _DEFAULT_HEARTBEAT_MS
    values["heartbeat_interval"] = interval_ms / 1000
    values["allowed_origins"] = values["allowed_origins"] or ()
    values["proxy_protocol_from"] = values["proxy_protocol_from"] or ()
    values["meta_channel"] = values["meta_channel"] or None
    values["wal_slot"] = values["wal_slot"] or None
    values["nats_servers"] = values["nats_servers"] or ()
    values["root_path"] = values["root_path"] or None
    return Config(**values)
