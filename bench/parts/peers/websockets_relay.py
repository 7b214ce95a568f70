"""A LISTEN/NOTIFY WebSocket relay written the way a Python user would write it.

The ``websockets`` asyncio server with its ``broadcast()``, psycopg's async connection for
LISTEN, PyJWT for the token; ``/TOKEN`` and ``/CHANNEL/TOKEN`` URLs; payloads forwarded
verbatim, routed by their ``channel`` key. A benchmark peer, not part of the product.

    PORT=3001 DB_URI=... SECRET=... LISTEN_CHANNEL=... python -m bench.parts.peers.websockets_relay
"""

import asyncio
import json
import os

import jwt
import psycopg
from websockets.asyncio.server import broadcast, serve

SECRET = os.environ["SECRET"]
LISTEN = os.environ["LISTEN_CHANNEL"]
subscribers: dict[str, set] = {}


async def handler(websocket):
    parts = websocket.request.path.split("?")[0].lstrip("/").split("/")
    requested, token = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.PyJWTError as exc:
        await websocket.close(1008, str(exc))
        return
    channels = [requested] if requested else claims.get("channels", [])
    for channel in channels:
        subscribers.setdefault(channel, set()).add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        for channel in channels:
            subscribers[channel].discard(websocket)


async def listen():
    conn = await psycopg.AsyncConnection.connect(os.environ["DB_URI"], autocommit=True)
    await conn.execute(f'LISTEN "{LISTEN}"')
    print("READY", flush=True)
    async for notify in conn.notifies():
        try:
            channel = json.loads(notify.payload).get("channel", LISTEN)
        except ValueError:
            channel = LISTEN
        broadcast(subscribers.get(channel, ()), notify.payload)


async def main():
    async with serve(handler, "127.0.0.1", int(os.environ["PORT"]), compression=None,
                     ping_interval=None, max_queue=None):
        await listen()


if __name__ == "__main__":
    asyncio.run(main())
