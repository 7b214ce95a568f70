"""The Python client library (:mod:`relay.client.subscription`, used by ``pgws-relay tail``).
The relay's own process never imports this package."""
