"""The house's layers, read from the source: what each room may import (docs/architecture.md).

Module-level imports only, followed through the package (an import inside a function, such as
the ``tail`` command's of the client library, is a deliberate late load). A rule broken here is
a room that has started doing another room's job: move the code, not the rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "relay"

#: What the pure core must not reach, directly or through another relay module: it is computed
#: from its arguments, tested without I/O and benchmarked in seconds.
IO = frozenset({"trio", "socket", "ssl", "psycopg", "wsproto", "h11", "trio_websocket",
                "selectors", "asyncio", "subprocess", "prometheus_client"})


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}


@cache
def imports(module: str) -> frozenset[str]:
    """What ``module`` imports at module level (absolute names; ``from a import b`` gives
    ``a.b`` when that is a relay module, else ``a``)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            continue  # Types only: no import at run time.
    return frozenset(found)


@cache
def reaches(module: str) -> frozenset[str]:
    """Everything ``module`` imports, followed through relay's own modules."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name in MODULES:
                    todo.append(name)
    return frozenset(seen)


def _in(room: str) -> list[str]:
    return sorted(name for name in MODULES if name == room or name.startswith(room + "."))


@pytest.mark.parametrize("module", _in("relay.core"))
def test_the_core_reaches_no_io(module: str) -> None:
    assert {name.split(".")[0] for name in reaches(module)} & IO == set()


@pytest.mark.parametrize("module", _in("relay.wire"))
def test_wire_formats_reach_no_io_and_no_room_but_each_other(module: str) -> None:
    tops = {name.split(".")[0] for name in reaches(module)}
    assert tops & (IO - {"wsproto"}) == set()  # wsproto is sans-I/O: its frame parser is wire.
    assert {name for name in reaches(module) if name.startswith("relay.")
            and not name.startswith("relay.wire")} == set()


@pytest.mark.parametrize("module", _in("relay.core"))
def test_the_core_knows_no_transports_bytes(module: str) -> None:
    """What a client receives is its stream's encoding's (relay.core.encoding): the hub and
    the history never build WebSocket frames themselves."""
    assert [name for name in reaches(module) if name.startswith("relay.wire.frames")] == []


def test_the_replication_protocol_is_pure() -> None:
    """The WAL source's bytes are read and written apart from its I/O (as the core is)."""
    assert {name.split(".")[0] for name in reaches("relay.sources.replication")} & IO == set()


@pytest.mark.parametrize("module", _in("relay.transports"))
def test_a_transport_never_imports_a_source(module: str) -> None:
    assert [name for name in reaches(module) if name.startswith("relay.sources")] == []


@pytest.mark.parametrize("module", _in("relay.sources"))
def test_a_source_never_imports_a_transport(module: str) -> None:
    assert [name for name in reaches(module) if name.startswith("relay.transports")] == []


@pytest.mark.parametrize("module", sorted(set(MODULES) - set(_in("relay.client"))))
def test_nothing_of_the_relay_loads_the_client_library(module: str) -> None:
    assert [name for name in reaches(module)
            if name.startswith("relay.client") or name == "trio_websocket"] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_package_never_imports_its_tests_or_benchmarks(module: str) -> None:
    assert {name.split(".")[0] for name in reaches(module)} & {"tests", "bench"} == set()


def test_the_relays_process_loads_no_client_library_when_it_runs() -> None:
    """The same, by running it: what the command imports before serving."""
    code = ("import sys, relay.cli, relay.app; "
            "print(sorted(m for m in sys.modules if m.startswith(('relay.client', "
            "'trio_websocket'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_each_rule_sees_a_broken_layer() -> None:
    """The rules catch what they are about: a core module that imported trio, a transport
    that imported a source (checked on the graph the rules read)."""
    for module, line, reached in (("relay.core.hub", "import trio\n", "trio"),
                                  ("relay.transports.static",
                                   "from relay.sources import notify\n", "relay.sources.notify"),
                                  ("relay.core.history", "from relay.wire import frames\n",
                                   "relay.wire.frames")):
        path = MODULES[module]
        imports.cache_clear()
        reaches.cache_clear()
        try:
            MODULES[module] = _Patched(path, line)  # type: ignore[assignment]
            assert reached in reaches(module)
        finally:
            MODULES[module] = path
            imports.cache_clear()
            reaches.cache_clear()


class _Patched:
    """A module's path whose text has one more line first."""

    def __init__(self, path: Path, line: str) -> None:
        self._path = path
        self._line = line

    def read_text(self) -> str:
        return self._line + self._path.read_text()
