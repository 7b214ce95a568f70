"""Send messages through the relay (a ``w`` or ``rw`` token), then close.

    TOKEN=$(pgws-relay token --mode w --channel chat)   # on the server: it needs the secret
    python examples/send.py ws://127.0.0.1:3000 "$TOKEN" hello --channel chat

For each message and each channel of the connection the relay NOTIFYs
``{"channel":…,"claims":{…},"event":"WebsocketMessage","payload":"hello"}`` on its listen
channel: database listeners and the channel's readers get it. Needs ``pip install websockets``.
"""

from __future__ import annotations

import argparse
import sys

from websockets.sync.client import connect


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the relay, e.g. ws://127.0.0.1:3000 or wss://host")
    parser.add_argument("token")
    parser.add_argument("messages", nargs="+")
    parser.add_argument("--channel")
    args = parser.parse_args()
    path = f"/{args.channel}/{args.token}" if args.channel else f"/{args.token}"
    with connect(args.url.rstrip("/") + path) as ws:
        for message in args.messages:
            ws.send(message)
    # The relay handles a client's messages in order, the close after them: all were sent.
    return 0


if __name__ == "__main__":
    sys.exit(main())
