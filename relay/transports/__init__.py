"""How clients reach the relay: one connection's HTTP requests (:mod:`relay.transports.server`),
request parsing (:mod:`relay.transports.request`), plain answers and static files
(:mod:`relay.transports.static`) and the WebSocket connection after its handshake
(:mod:`relay.transports.websocket`). Transports never know which source is running."""
