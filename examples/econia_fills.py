"""Follow one Econia market's fills, each exactly once, through relay restarts.

    export PGWS_TOKEN=$(pgws-relay token --mode r --channel fill_event)   # on the server
    python examples/econia_fills.py ws://127.0.0.1:3000 postgresql://econia@db/econia --market 7

The relay keeps a short history, so a reconnect usually resumes where it left off and nothing
is missed. When it cannot (the relay restarted, the client was away too long, the relay lost
LISTEN), the subscription says so with a ``Lost`` event, and the database, which has every
fill, fills the hole. The consumer keeps the key of the last fill it applied,
``(txn_version, event_idx)``, and:

1. subscribes to ``fill_event`` narrowed to the market (``payload.market_id=eq.N``), and waits
   for the connection, so that everything committed from then on will arrive;
2. catches up from ``fill_events``: the rows after that key (at start, ``--after`` or the
   newest fill: "from now on");
3. applies each live fill whose key is after the last applied one: a fill it has just read from
   the database may arrive live as well, and is skipped;
4. on ``Lost``, goes back to 2.

Keys grow in commit order (Econia's processor writes transactions in version order), which is
what makes "after the last key" exact. Each fill is stored twice, once per event handle; as
Econia's ``api.fill_events_deduped`` does, only the maker's copy (``emit_address =
maker_address``) counts. Prints one line per fill: ``TXN_VERSION:EVENT_IDX price=P size=S``
and where it came from (``live`` or ``database``). Needs the relay package (``pip install
pgws-relay``) and psycopg.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import psycopg
import trio

from relay.client.subscription import Lost, subscribe

Key = tuple[int, int]

CATCH_UP = """
SELECT txn_version, event_idx, price, size FROM fill_events
WHERE market_id = %(market)s AND emit_address = maker_address
  AND (txn_version, event_idx) > (%(txn_version)s, %(event_idx)s)
ORDER BY txn_version, event_idx"""

NEWEST = """
SELECT txn_version, event_idx FROM fill_events WHERE market_id = %(market)s
ORDER BY txn_version DESC, event_idx DESC LIMIT 1"""


def query(db_uri: str, sql: str, **params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_uri) as db:
        return db.execute(sql, params).fetchall()


class Fills:
    """The last applied key, and the one place that applies a fill."""

    def __init__(self, db_uri: str, market: int, after: Key) -> None:
        self.db_uri, self.market, self.last = db_uri, market, after

    def apply(self, txn_version: int, event_idx: int, price: int, size: int,
              source: str) -> None:
        key = (int(txn_version), int(event_idx))
        if key <= self.last:
            return  # Already applied (read from the database, and now live too).
        self.last = key
        print(f"{key[0]}:{key[1]} price={price} size={size} {source}", flush=True)

    async def catch_up(self) -> None:
        rows = await trio.to_thread.run_sync(
            lambda: query(self.db_uri, CATCH_UP, market=self.market,
                          txn_version=self.last[0], event_idx=self.last[1]))
        for txn_version, event_idx, price, size in rows:
            self.apply(txn_version, event_idx, price, size, "database")

    def live(self, payload: str) -> None:
        fill = json.loads(payload)["payload"]
        if fill["emit_address"] == fill["maker_address"]:
            self.apply(fill["txn_version"], fill["event_idx"], fill["price"], fill["size"],
                       "live")


async def follow(url: str, token: str | None, db_uri: str, market: int,
                 after: Key | None) -> None:
    if after is None:
        newest = await trio.to_thread.run_sync(lambda: query(db_uri, NEWEST, market=market))
        after = (int(newest[0][0]), int(newest[0][1])) if newest else (-1, -1)
    fills = Fills(db_uri, market, after)
    async with subscribe(f"{url.rstrip('/')}/fill_event", token=token,
                         filters=[f"payload.market_id=eq.{market}"]) as subscription:
        await subscription.wait_connected()
        await fills.catch_up()
        print(f"following market {market} after {fills.last[0]}:{fills.last[1]}",
              file=sys.stderr, flush=True)
        async for event in subscription:
            if isinstance(event, Lost):
                print(f"lost ({event.reason}): catching up from the database", file=sys.stderr,
                      flush=True)
                await fills.catch_up()
            else:
                fills.live(event.payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the relay, e.g. ws://127.0.0.1:3000")
    parser.add_argument("db_uri", help="the Econia database (its fill_events table)")
    parser.add_argument("--market", type=int, required=True)
    parser.add_argument("--after", metavar="TXN_VERSION:EVENT_IDX",
                        help="start after this fill (default: the newest: from now on)")
    parser.add_argument("--token", default=os.environ.get("PGWS_TOKEN"),
                        help="a token for fill_event (default: $PGWS_TOKEN)")
    args = parser.parse_args()
    after: Key | None = None
    if args.after:
        txn_version, _, event_idx = args.after.partition(":")
        after = (int(txn_version), int(event_idx))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop, quietly.
        trio.run(follow, args.url, args.token, args.db_uri, args.market, after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
