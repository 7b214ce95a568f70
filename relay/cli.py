"""The ``pgws-relay`` command: flags and environment → Config → run; ``token``; exit statuses.

``pgws-relay [--FLAG VALUE ...]`` runs the relay. ``pgws-relay token --mode r --channel C``
prints a token signed with the relay's own secret settings (:mod:`relay.mint`), so what it
mints is what a relay with the same settings accepts; it reads ``PGWS_JWT_SECRET`` and
``PGWS_JWT_SECRET_BASE64`` (or their flags) and nothing else.

Exit status: 0 after SIGTERM/SIGINT, 1 when the listener gave up or the port cannot be bound,
2 for configuration errors: every problem found, one line each on stderr
(``pgws-relay: VARIABLE: problem``), before any worker starts or any port is bound. The secret
is read then too: a ``PGWS_JWT_SECRET`` with no key that can verify signatures, or an HMAC
secret shorter than HS256 needs (every token would be refused), is such an error; one too short
for HS384/HS512 gets a warning. With several workers the supervisor's status is that of the
first worker that ended on its own (see relay/workers.py). ``token`` exits 0 with the token on
stdout, or 2 with the reason on stderr (one line, or argparse's usage and error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import trio

from relay import __version__, app, auth, logs, mint, workers
from relay.config import (
    SECRET_VARIABLES,
    SETTINGS,
    Config,
    ConfigError,
    Problem,
    load,
    load_secret,
)

log = logging.getLogger("relay.auth")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgws-relay",
        description="WebSocket relay for PostgreSQL LISTEN/NOTIFY, compatible with "
                    "postgres-websockets. Every setting is an environment variable; a flag "
                    "overrides it.",
        epilog="pgws-relay token --help: mint a token this relay accepts.",
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
    parser.add_argument("--alg", choices=sorted(auth.ALLOWED_ALGORITHMS),
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


def read_keys(secret: bytes) -> auth.LoadedKeys:
    """The verification keys of ``secret``, or :class:`ConfigError` naming ``PGWS_JWT_SECRET``
    when no token could ever verify: no usable key, or an HMAC secret shorter than HS256 needs.

    Shared by the relay and ``token``, so that ``token`` refuses what the relay refuses.
    """
    try:
        loaded = auth.read_secret(secret)
    except auth.SecretError as exc:
        raise ConfigError("PGWS_JWT_SECRET", str(exc)) from None
    shortest = min(auth.HMAC_MIN_BYTES.values())
    if loaded.raw_secret and len(secret) < shortest:
        # Upstream starts and then refuses every token as an invalid signature; an operator
        # would only find out from the clients. Here it is a start-up error that says why.
        raise ConfigError("PGWS_JWT_SECRET", f"HMAC secret is {len(secret)} bytes; HS256 needs "
                                             f"at least {shortest}, so every token would be "
                                             "refused")
    return loaded


def hmac_warning(secret: bytes, loaded: auth.LoadedKeys) -> str | None:
    """One line when a raw HMAC secret verifies HS256 but is too short for HS384 or HS512."""
    if not loaded.raw_secret:
        return None
    refused = [(name, need) for name, need in sorted(auth.HMAC_MIN_BYTES.items())
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
    except (mint.MintError, auth.SecretError) as exc:
        print(f"pgws-relay token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def check(env: dict[str, str]) -> tuple[Config, auth.LoadedKeys]:
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
    loaded: auth.LoadedKeys | None = None
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
    worker = int(os.environ[workers.WORKER_ENV]) if workers.is_worker() else None
    logs.configure(config.log_level, config.log_format, worker)
    warning = hmac_warning(config.jwt_secret, loaded)
    if warning is not None and worker is None:  # Once per start, not once per worker.
        log.warning("%s", warning)
    if config.workers > 1:
        return workers.supervise(env, config)  # Each worker logs the keys it skips.
    for line in loaded.skipped:  # One line per key, naming it without its material.
        log.warning("PGWS_JWT_SECRET: %s", line)
    try:
        return trio.run(app.run, config, loaded.keys, workers.is_worker(),
                        workers.admin_socket())
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["token"]:
        return _token(arguments[1:])
    return _run(arguments)
