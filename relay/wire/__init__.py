"""Bytes shared by the server and the client library: WebSocket frames, permessage-deflate and
the resume protocol's positions and control events. No I/O."""
