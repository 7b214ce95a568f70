"""A stand-in for Econia's ``examples/event.py`` (dss-v1.6.1), as econia.md section 4 reads it.

Reads WS_URL, WS_CHANNEL and JWT_SECRET, mints ``{"mode": "r", "channels": [channel]}`` with
HS256, connects websocket-client's ``WebSocketApp`` to ``<WS_URL>/<jwt>``, sends nothing, and
prints every frame as it comes. (The original pins PyJWT 1.7.1 and runs under ``rel``; the bytes
on the wire are the same.)
"""

import os

import jwt
import websocket


def on_message(ws, message):
    print(message, flush=True)


def on_error(ws, error):
    print(error, flush=True)


def on_close(ws, close_status_code, close_msg):
    print("### closed ###", flush=True)


def on_open(ws):
    print("Opened connection", flush=True)


def start():
    host_ws = os.environ["WS_URL"]
    channel = os.environ["WS_CHANNEL"]
    secret = os.environ["JWT_SECRET"]
    token = jwt.encode({"mode": "r", "channels": [channel]}, secret, algorithm="HS256")
    ws = websocket.WebSocketApp(f"{host_ws}/{token}", on_open=on_open, on_message=on_message,
                                on_error=on_error, on_close=on_close)
    ws.run_forever()


if __name__ == "__main__":
    start()
