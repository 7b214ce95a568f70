"""Where the benchmarks' files are, and how a benchmark starts another of its modules.

Paths are computed from this package's location, never from the working directory, so a
script writes ``bench/results/`` and reads ``deploy/`` wherever it is started from. Every
script runs as a module from the repository root (``python -m bench.scenarios.c100k``); the
processes a script starts (load clients, peers, producers) are modules too, started by
:func:`module_command` with :func:`module_env`, which adds the repository root to the end of the
child's ``PYTHONPATH``: the child imports this checkout's ``bench`` whatever its working
directory, and a ``PYTHONPATH`` that points at another checkout's ``relay`` still wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: ``bench/``.
BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The repository root (the checkout that holds ``bench/`` and ``relay/``).
ROOT = os.path.dirname(BENCH)
#: Stored results: one JSON file per scenario, with the commit and the command.
RESULTS = os.path.join(BENCH, "results")
#: What operators are given (``deploy/haproxy.cfg`` is the fleet's balancer).
DEPLOY = os.path.join(ROOT, "deploy")


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args``, with this interpreter (the same venv as the parent)."""
    return [sys.executable, "-m", module, *args]


def module_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`ROOT` last on
    ``PYTHONPATH``, so that a child started by :func:`module_command` imports ``bench``."""
    env = dict(os.environ if base is None else base)
    before = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = (before + os.pathsep if before else "") + ROOT
    return env
