"""The ``pgws-relay`` command: flags and environment → Config → run; exit statuses.

Exit status: 0 after SIGTERM/SIGINT, 1 when the listener gave up or the port cannot be bound,
2 for a configuration error (one line on stderr naming the variable), a ``PGWS_JWT_SECRET``
with no key that can verify signatures included: the secret is read before any worker starts
or any port is bound. With several workers the supervisor's status is that of the first worker
that ended on its own (see relay/workers.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from relay import __version__, app, auth, workers
from relay.config import SETTINGS, Config, ConfigError, load

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgws-relay",
        description="WebSocket relay for PostgreSQL LISTEN/NOTIFY, compatible with "
                    "postgres-websockets. Every setting is an environment variable; a flag "
                    "overrides it.",
    )
    parser.add_argument("--version", action="version", version=f"pgws-relay {__version__}")
    for setting in SETTINGS:
        default = "required" if setting.required else (
            "unset" if setting.default is None else f"default {setting.default}")
        parser.add_argument(setting.flag, dest=setting.variable, metavar="VALUE",
                            help=f"{setting.variable} ({default}): {setting.help}")
    return parser


def read_keys(config: Config) -> auth.LoadedKeys:
    """The verification keys of ``PGWS_JWT_SECRET``; :class:`ConfigError` if it has none."""
    try:
        return auth.read_secret(config.jwt_secret)
    except auth.SecretError as exc:
        raise ConfigError("PGWS_JWT_SECRET", str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    env.update({name: value for name, value in vars(args).items() if value is not None})
    try:
        config = load(env)
        keys = read_keys(config)
    except ConfigError as exc:
        print(f"pgws-relay: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return workers.supervise(env, config.workers)  # Each worker logs the keys it skips.
    log_format = _LOG_FORMAT
    if workers.is_worker():
        log_format = f"%(asctime)s [worker {os.environ[workers.WORKER_ENV]}] %(levelname)s " \
                     "%(name)s: %(message)s"
    logging.basicConfig(level=config.log_level, format=log_format, stream=sys.stderr)
    for line in keys.skipped:  # One line per key, naming it without its material.
        logging.getLogger("relay.auth").warning("PGWS_JWT_SECRET: %s", line)
    try:
        return trio.run(app.run, config, keys.keys, workers.is_worker())
    except KeyboardInterrupt:
        return 0
