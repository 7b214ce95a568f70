"""A read-only subscriber: print each message the relay sends, one per line.

    TOKEN=$(pgws-relay token --mode r --channel chat)   # on the server: it needs the secret
    python examples/listen.py ws://127.0.0.1:3000 "$TOKEN" --channel chat

``--channel`` connects to ``/CHANNEL/TOKEN``; without it, to ``/TOKEN`` (every channel of the
token's ``channels`` claim). ``--count N`` exits after N messages. Messages are printed as the
relay sends them: the NOTIFY payload, verbatim. Needs ``pip install websockets``.
"""

from __future__ import annotations

import argparse
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the relay, e.g. ws://127.0.0.1:3000 or wss://host")
    parser.add_argument("token")
    parser.add_argument("--channel")
    parser.add_argument("--count", type=int, default=0, help="exit after this many (0: never)")
    args = parser.parse_args()
    path = f"/{args.channel}/{args.token}" if args.channel else f"/{args.token}"
    with connect(args.url.rstrip("/") + path) as ws:
        print("connected", file=sys.stderr, flush=True)
        try:
            for received, message in enumerate(ws, start=1):
                print(message, flush=True)
                if received == args.count:
                    return 0
        except ConnectionClosed as closed:  # 3001 when the token expires, 1013 if too slow
            print(f"closed: {closed.rcvd}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
