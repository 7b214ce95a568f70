#!/usr/bin/env bash
# Install what the benchmark needs beyond the project's test extras: the bench extra
# (matplotlib for the report) and the Node.js peer's packages (ws, pg, jsonwebtoken from npm).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test,bench]'
if ! command -v node >/dev/null 2>&1; then
  echo "node is not installed: apt-get install -y nodejs npm (the Node peer needs it)" >&2
  exit 1
fi
(cd bench/parts/peers/node && npm ci --no-audit --no-fund --loglevel=error)
# Bun from the npm registry (its package fetches the platform's binary): the Bun peer.
(cd bench/parts/peers/bun && npm ci --no-audit --no-fund --loglevel=error)
