"""Secrets to keys, tokens to claims, claims and a request to a grant, with the exact refusal
texts (:mod:`relay.auth.tokens`); minting tokens with the relay's own settings
(:mod:`relay.auth.mint`). Never a socket, never a token in a log line."""
