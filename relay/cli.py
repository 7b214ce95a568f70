"""The ``pgws-relay`` command: flags and environment → Config → run; ``token``; exit statuses.

``pgws-relay [--FLAG VALUE ...]`` runs the relay. ``pgws-relay token --mode r --channel C``
prints a token signed with the relay's own secret settings (:mod:`relay.auth.mint`), so what it
mints is what a relay with the same settings accepts; it reads ``PGWS_JWT_SECRET`` and
``PGWS_JWT_SECRET_BASE64`` (or their flags) and nothing else.

Exit status: 0 after SIGTERM/SIGINT, 1 when the listener gave up or the port cannot be bound,
2 for configuration errors: every problem found, one line each on stderr
(``pgws-relay: VARIABLE: problem``), before any worker starts or any port is bound. The secret
is read then too: a ``PGWS_JWT_SECRET`` with no key that can verify signatures, or an HMAC
secret shorter than HS256 needs (every token would be refused), is such an error; one too short
for HS384/HS512 gets a warning. With several workers the supervisor's status is that of the
first worker that ended on its own (see relay/ops/workers.py). ``token`` exits 0 with the token on
stdout, or 2 with the reason on stderr (one line, or argparse's usage and error).

``pgws-relay feed`` reads the database's log into a NATS JetStream stream for relays with
``PGWS_SOURCE=nats`` (:mod:`relay.sources.feed`); the same exit statuses as the relay.

``pgws-relay drop-slot`` drops the replication slot of a relay retired for good
(``PGWS_DB_URI``, ``PGWS_WAL_SLOT`` or their flags): a slot nobody reads keeps the WAL it has not
confirmed until the disk fills. Exit 0 when dropped, 1 when it cannot be (none of that name, still
read, refused), 2 for bad settings.

``pgws-relay tail URL`` prints a channel's messages, one per line, as they arrive, resuming
across reconnects: a thin wrapper over :mod:`relay.client.subscription`. It exits 0 on
SIGINT/SIGTERM
(naming the position to resume from on stderr), 1 when the relay refuses it for good, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

import psycopg
import trio

from relay import __version__, app
from relay.auth import mint, sealing, tokens
from relay.config import (
    SECRET_VARIABLES,
    SETTINGS,
    Config,
    ConfigError,
    Problem,
    load,
    load_secret,
    read_setting,
)
from relay.ops import logs, workers
from relay.sources import wal
from relay.sources.outage import first_line
from relay.wire import positions

log = logging.getLogger("relay.auth")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgws-relay",
        description="WebSocket relay for PostgreSQL LISTEN/NOTIFY, compatible with "
                    "postgres-websockets. Every setting is an environment variable; a flag "
                    "overrides it.",
        epilog="pgws-relay token --help: mint a token this relay accepts. "
               "pgws-relay tail --help: print a channel's messages as they arrive. "
               "pgws-relay drop-slot --help: drop a retired relay's replication slot. "
               "pgws-relay feed --help: feed a NATS JetStream stream from the database's log.",
    )
    parser.add_argument("--version", action="version", version=f"pgws-relay {__version__}")
    for setting in SETTINGS:
        default = "required" if setting.required else (
            "unset" if setting.default is None else f"default {setting.default}")
        parser.add_argument(setting.flag, dest=setting.variable, metavar="VALUE",
                            help=f"{setting.variable} ({default}): {setting.help}")
    return parser


def _token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgws-relay token",
        description="Print a JWT signed with the relay's secret (PGWS_JWT_SECRET, "
                    "PGWS_JWT_SECRET_BASE64, or their flags), as the relay reads it: a raw "
                    "HMAC secret signs HS256 (or --alg HS384/HS512); a JWK or JWK Set must "
                    "hold a private key, which signs with its own algorithm.",
    )
    parser.add_argument("--mode", required=True, choices=mint.MODES,
                        help="r: read, w: write, rw: both")
    channels = parser.add_mutually_exclusive_group(required=True)
    channels.add_argument("--channel", metavar="CHANNEL", help="the one channel allowed")
    channels.add_argument("--channels", metavar="A,B", help="comma-separated channels allowed")
    parser.add_argument("--exp", type=int, metavar="SECONDS",
                        help="expire this many seconds from now (unset: never)")
    parser.add_argument("--filter", action="append", default=[], metavar="PATH=OP.VALUE",
                        dest="filters",
                        help="a filter the client cannot widen (the filters claim), e.g. "
                             "payload.market_id=eq.7; repeat for several (all must hold)")
    parser.add_argument("--alg", choices=sorted(tokens.ALLOWED_ALGORITHMS),
                        help="signature algorithm (default: HS256 for an HMAC secret, the "
                             "key's own for a JWK)")
    parser.add_argument("--kid", help="the key of the JWK Set to sign with (default: the first "
                                      "that can sign)")
    for setting in SETTINGS:
        if setting.variable in SECRET_VARIABLES:
            parser.add_argument(setting.flag, dest=setting.variable, metavar="VALUE",
                                help=f"{setting.variable}: {setting.help}")
    return parser


def _environment(args: argparse.Namespace, names: Sequence[str] | None = None
                 ) -> dict[str, str]:
    """The process environment (only ``names`` of it, if given), flags overriding it."""
    env = {name: value for name, value in os.environ.items() if names is None or name in names}
    env.update({name: value for name, value in vars(args).items()
                if name.startswith("PGWS_") and value is not None})
    return env


def read_keys(secret: bytes) -> tokens.LoadedKeys:
    """The verification keys of ``secret``, or :class:`ConfigError` naming ``PGWS_JWT_SECRET``
    when no token could ever verify: no usable key, or an HMAC secret shorter than HS256 needs.

    Shared by the relay and ``token``, so that ``token`` refuses what the relay refuses.
    """
    try:
        loaded = tokens.read_secret(secret)
    except tokens.SecretError as exc:
        raise ConfigError("PGWS_JWT_SECRET", str(exc)) from None
    shortest = min(tokens.HMAC_MIN_BYTES.values())
    if loaded.raw_secret and len(secret) < shortest:
        # Upstream starts and then refuses every token as an invalid signature; an operator
        # would only find out from the clients. Here it is a start-up error that says why.
        raise ConfigError("PGWS_JWT_SECRET", f"HMAC secret is {len(secret)} bytes; HS256 needs "
                                             f"at least {shortest}, so every token would be "
                                             "refused")
    return loaded


def hmac_warning(secret: bytes, loaded: tokens.LoadedKeys) -> str | None:
    """One line when a raw HMAC secret verifies HS256 but is too short for HS384 or HS512."""
    if not loaded.raw_secret:
        return None
    refused = [(name, need) for name, need in sorted(tokens.HMAC_MIN_BYTES.items())
               if len(secret) < need]
    if not refused:
        return None
    needs = " and ".join(f"{name} at least {need}" for name, need in refused)
    names = " and ".join(name for name, _ in refused)
    return (f"PGWS_JWT_SECRET: HMAC secret is {len(secret)} bytes; {needs}, so {names} tokens "
            "will be refused")


def _report(problems: Sequence[Problem]) -> int:
    for problem in problems:
        print(f"pgws-relay: {problem}", file=sys.stderr)
    return 2


def _token(argv: Sequence[str]) -> int:
    args = _token_parser().parse_args(argv)
    env = _environment(args, sorted(SECRET_VARIABLES))
    channels = [args.channel] if args.channel is not None else \
        [name.strip() for name in args.channels.split(",")]
    try:
        secret = load_secret(env)
        read_keys(secret)
        claims = mint.claims(args.mode, channels, args.exp, time.time(), args.filters)
        token = mint.mint(secret, claims, args.alg, args.kid)
    except ConfigError as exc:
        return _report(exc.problems)
    except (mint.MintError, tokens.SecretError) as exc:
        print(f"pgws-relay token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def check(env: dict[str, str]) -> tuple[Config, tokens.LoadedKeys]:
    """The configuration and its keys, or one :class:`ConfigError` listing every problem."""
    problems: list[Problem] = []
    config: Config | None = None
    secret: bytes | None = None
    try:
        config = load(env)
        secret = config.jwt_secret
    except ConfigError as exc:
        problems.extend(exc.problems)
    if config is None and not any(problem.variable in SECRET_VARIABLES for problem in problems):
        # The secret itself read fine: what its keys lack belongs in the same report.
        try:
            secret = load_secret(env)
        except ConfigError as exc:  # Its @file changed in between.
            problems.extend(exc.problems)
    loaded: tokens.LoadedKeys | None = None
    if secret is not None:
        try:
            loaded = read_keys(secret)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems or config is None or loaded is None:
        raise ConfigError.of(problems)
    return config, loaded


def _run(argv: Sequence[str]) -> int:
    env = _environment(_parser().parse_args(argv))
    try:
        config, loaded = check(env)
    except ConfigError as exc:
        return _report(exc.problems)
    if config.source == "nats" and (missing := _nats_missing()) is not None:
        return _report([missing])
    worker = int(os.environ[workers.WORKER_ENV]) if workers.is_worker() else None
    logs.configure(config.log_level, config.log_format, worker)
    warning = hmac_warning(config.jwt_secret, loaded)
    if warning is not None and worker is None:  # Once per start, not once per worker.
        log.warning("%s", warning)
    sealing_keys, unshared = sealing.position_keys(
        config.position_key, config.position_key_previous, config.jwt_secret, loaded)
    if unshared is not None:
        log.warning("%s", unshared)
    if config.workers > 1:
        if unshared is not None:  # One random key for all the workers, not one each.
            env = {**env, sealing.KEY_VARIABLE: sealing_keys[0].decode()}
        return workers.supervise(env, config)  # Each worker logs the keys it skips.
    for line in loaded.skipped:  # One line per key, naming it without its material.
        log.warning("PGWS_JWT_SECRET: %s", line)
    try:
        return trio.run(app.run, config, loaded.keys, positions.Sealer(sealing_keys),
                        workers.is_worker(), workers.admin_socket(), workers.lifeline())
    except KeyboardInterrupt:
        return 0
    except Exception:
        # A bug that escaped every containment: one line with the traceback for the operator,
        # and a status of its own, so a supervisor tells it from a listener that gave up (1).
        log.critical("internal error; the relay stops", exc_info=True)
        return workers.CRASHED


def _feed(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pgws-relay feed",
        description="Read the database's log (as PGWS_SOURCE=wal does, from PGWS_WAL_SLOT) and "
                    "publish every message to the NATS JetStream stream PGWS_NATS_STREAM, which "
                    "relays with PGWS_SOURCE=nats read. Every setting is an environment "
                    "variable; a flag overrides it.")
    for setting in SETTINGS:
        if setting.variable not in SECRET_VARIABLES:
            parser.add_argument(setting.flag, dest=setting.variable, metavar="VALUE",
                                help=f"{setting.variable}: {setting.help}")
    env = {**_environment(parser.parse_args(argv)), "PGWS_SOURCE": "wal"}
    try:
        config = load(env, secret=False)
    except ConfigError as exc:
        return _report(exc.problems)
    if not config.nats_servers:
        return _report([Problem("PGWS_NATS_URL", "required by feed: the NATS servers to "
                                "publish to")])
    missing = _nats_missing()
    if missing is not None:
        return _report([missing])
    logs.configure(config.log_level, config.log_format, None)
    from relay.sources.feed import run_feed  # nats-py: loaded by the commands that use it.

    return trio.run(run_feed, config, app.connect_options(config.db_uri))


def _nats_missing() -> Problem | None:
    """A problem when nats-py is not installed (it is the ``nats`` extra)."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return Problem("PGWS_NATS_URL", "NATS needs the nats extra: pip install "
                                        "'pgws-relay[nats]'")
    return None


def _drop_slot(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pgws-relay drop-slot",
        description="Drop the replication slot of a relay retired for good (PGWS_SOURCE=wal), "
                    "so that PostgreSQL no longer keeps WAL for it.")
    names = ("PGWS_DB_URI", "PGWS_WAL_SLOT")
    for setting in SETTINGS:
        if setting.variable in names:
            parser.add_argument(setting.flag, dest=setting.variable, metavar="VALUE",
                                help=f"{setting.variable}: {setting.help}")
    env = _environment(parser.parse_args(argv), names)
    missing = [Problem(name, "required by drop-slot") for name in names if not env.get(name)]
    if missing:
        return _report(missing)
    try:
        db_uri = read_setting("PGWS_DB_URI", env)  # @file, and a URI that parses.
        slot = read_setting("PGWS_WAL_SLOT", env)
    except ConfigError as exc:
        return _report(exc.problems)
    try:
        wal.drop_slot(db_uri, slot, app.connect_options(db_uri))
    except wal.SlotNotDropped as exc:
        print(f"pgws-relay drop-slot: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"pgws-relay drop-slot: cannot reach the database: {first_line(exc)}",
              file=sys.stderr)
        return 1
    print(f"dropped replication slot {slot!r}")
    return 0


def _tail_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgws-relay tail",
        description="Print each message of a relay's channel on its own line as it arrives, "
                    "resuming across reconnects (lost messages, reconnects and the position to "
                    "resume from go to stderr). Works with postgres-websockets too, without "
                    "resuming.",
    )
    parser.add_argument("url", help="ws://HOST:PORT/CHANNEL or wss://…; with / alone, the "
                                    "token's channels claim")
    parser.add_argument("--token", help="the JWT, sent as Authorization: Bearer (default: "
                                        "$PGWS_TOKEN, which other users cannot see in ps; "
                                        "neither: the URL carries it)")
    parser.add_argument("--filter", action="append", default=[], metavar="PATH=OP.VALUE",
                        dest="filters", help="only messages that match, e.g. "
                                             "payload.market_id=eq.7; repeat: all must hold")
    parser.add_argument("--from", dest="position", metavar="POSITION",
                        help="start after this position, as --positions or the exit line "
                             "printed it")
    parser.add_argument("--positions", action="store_true",
                        help="print POSITION<TAB>PAYLOAD (- when the relay sends none)")
    return parser


def _tail(argv: Sequence[str]) -> int:
    # Here, not at the top: the relay's own process never loads the client library.
    try:
        from relay.client import subscription
    except ImportError as missing:
        print(f"pgws-relay tail: needs the client library's extra ({missing.name} is missing): "
              "pip install 'pgws-relay[client]'", file=sys.stderr)
        return 2

    parser = _tail_parser()
    args = parser.parse_args(argv)
    try:
        subscription.Endpoint.parse(args.url, args.filters)
    except ValueError as exc:
        parser.error(str(exc))
    if args.position is not None and positions.parse_position(args.position) is None:
        parser.error(f"--from: not a position: {args.position!r}")
    token = args.token if args.token is not None else os.environ.get("PGWS_TOKEN") or None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("pgws-relay tail: %(message)s"))
    library_log = logging.getLogger(subscription.log.name)
    library_log.addHandler(handler)
    library_log.setLevel(logging.INFO)
    library_log.propagate = False
    try:
        return trio.run(_follow, args, token)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place.
        return 0


async def _follow(args: argparse.Namespace, token: str | None) -> int:
    """Print until a signal (0) or a refusal (1); then where to resume, on stderr."""
    from relay.client import subscription

    status = 0
    current: subscription.Subscription | None = None

    async def printing(stop: trio.CancelScope) -> None:
        nonlocal status, current
        try:
            async with subscription.subscribe(args.url, token=token, filters=args.filters,
                                              position=args.position) as current:
                async for event in current:
                    if isinstance(event, subscription.Lost):
                        print(f"pgws-relay tail: lost ({event.reason}): messages may be "
                              f"missing; going on after {event.position or 'now'}",
                              file=sys.stderr, flush=True)
                    elif args.positions:
                        print(f"{event.position or '-'}\t{_safe(event.payload, sys.stdout)}",
                              flush=True)
                    else:
                        print(_safe(event.payload, sys.stdout), flush=True)
        except subscription.Refused as exc:
            print(f"pgws-relay tail: refused: {_one_line(str(exc))}", file=sys.stderr)
            status = 1
        except subscription.SubscriptionError as exc:
            print(f"pgws-relay tail: {_one_line(str(exc))}", file=sys.stderr)
            status = 1
        except BrokenPipeError:  # The reader of stdout went away (| head): done.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        stop.cancel()

    async def until_signal(signals: AsyncIterator[int], stop: trio.CancelScope) -> None:
        async for _ in signals:
            stop.cancel()
            return

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(printing, nursery.cancel_scope)
            nursery.start_soon(until_signal, signals, nursery.cancel_scope)
    position = current.position if current is not None else args.position
    if status == 0:
        print("pgws-relay tail: stopped" + (f"; resume with --from {position}" if position
                                            else ""), file=sys.stderr)
    return status


def _one_line(text: str) -> str:
    return _safe(" ".join(text.split()), sys.stderr)


#: Control characters (C0 but tab, DEL, C1): a terminal would obey them (escape sequences can
#: retitle a window, move the cursor, hide text), so a relay's text shown on one escapes them.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class _SafeFormatter(logging.Formatter):
    """The library's log lines carry a server's text (a refusal's body, a close reason)."""

    def format(self, record: logging.LogRecord) -> str:
        return _safe(super().format(record), sys.stderr)


def _safe(text: str, stream: TextIO) -> str:
    """``text`` as it may be shown on ``stream``: control characters as ``\\xNN`` on a
    terminal, untouched elsewhere (a pipe gets the payload exactly)."""
    if not stream.isatty():
        return text
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["token"]:
        return _token(arguments[1:])
    if arguments[:1] == ["tail"]:
        return _tail(arguments[1:])
    if arguments[:1] == ["drop-slot"]:
        return _drop_slot(arguments[1:])
    if arguments[:1] == ["feed"]:
        return _feed(arguments[1:])
    return _run(arguments)
