"""A capped link for benchmarks: load clients in a network namespace of their own, joined to the
host namespace (where the relay and PostgreSQL stay) by a veth pair shaped on the relay's side.

    with CappedLink(rate="200mbit") as link:
        Server("relay", port, {"PGWS_HOST": link.host_address})
        FrameClients(link.host_address, port, conns, prefix=link.exec_prefix())

Theory of operation
-------------------
The relay must reach PostgreSQL on 127.0.0.1:5432, which exists only in the host namespace, so
the relay stays there and only the clients move: a namespace ``pgwsb<pid>`` holds the veth end
``pgwsc<pid>``; the other end, ``pgwsh<pid>``, stays in the host namespace. Each end gets an
address of one /30 in 10.231.0.0/16 (picked from the pid, skipping any /30 already on an
interface), so the relay listens on ``host_address`` and the clients connect to it through the
veth pair: every byte the relay sends to a client leaves through ``pgwsh<pid>``, whose egress
is shaped. The host-side address exists only while the link does.

The shaper is ``tbf`` (a token bucket filter) at the root of ``pgwsh<pid>``: one link, one
rate, no classes to share it, which is all a capped link needs (``htb`` adds classes and
nothing here would use them). ``burst`` (256 kb by default) must hold at least one GSO
super-packet of 64 KiB, or tbf splits them, and lets the bucket absorb a timer tick's worth of
traffic at 200 Mbit/s; ``latency`` (50 ms) bounds the queue to what the link drains in that
time, as a router's buffer would: a longer queue adds delay, not throughput. Only the relay's
direction is capped; the clients' acknowledgements go back unshaped.

Clean-up: :meth:`CappedLink.close` deletes the veth pair (both ends go together) and the
namespace, tolerating a partial set-up; the ``with`` block calls it on any exit, and the
scripts turn SIGTERM/SIGHUP into an exception (:func:`exit_on_signals`) so that it runs then
too, as it does on Ctrl-C. Names carry the pid, so a leftover of a killed run is easy to tell
apart, and :func:`remove_stale` deletes those whose process is gone. Needs root, ``ip`` and
``tc``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFIX_NS = "pgwsb"
PREFIX_HOST = "pgwsh"
PREFIX_PEER = "pgwsc"
NETWORK = ipaddress.ip_network("10.231.0.0/16")
_SENT = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+) "
                   r"requeues (\d+)\)")


def _run(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def _used_addresses() -> set[ipaddress.IPv4Address]:
    out = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    return {ipaddress.ip_interface(word).ip for line in out.splitlines()
            for word in line.split() if "/" in word and word[0].isdigit()}


def _pick_block() -> ipaddress.IPv4Network:
    """A /30 of :data:`NETWORK` that no interface here uses, starting from one the pid picks."""
    blocks = NETWORK.num_addresses // 4
    used = _used_addresses()
    for step in range(blocks):
        block = ipaddress.ip_network(
            (int(NETWORK.network_address) + 4 * ((os.getpid() + step) % blocks), 30))
        if not set(block) & used:
            return block
    raise RuntimeError(f"no free /30 in {NETWORK}")


class CappedLink:
    """Namespace + veth pair + tbf on the host end; see the module's docstring."""

    def __init__(self, rate: str = "200mbit", burst: str = "256kb", latency: str = "50ms",
                 limit: str | None = None) -> None:
        pid = os.getpid()
        self.namespace = f"{PREFIX_NS}{pid}"
        self.host_interface = f"{PREFIX_HOST}{pid}"
        self.peer_interface = f"{PREFIX_PEER}{pid}"
        self.rate, self.burst, self.latency = rate, burst, latency
        #: The queue's size in bytes (tc units, e.g. ``16mb``) instead of ``latency``.
        self.limit = limit
        self.host_address = ""
        self.client_address = ""
        self._open = False

    def open(self) -> CappedLink:
        if os.geteuid() != 0:
            raise RuntimeError("a capped link needs root (ip netns, tc)")
        self._open = True  # From here on, close() has something to undo.
        try:
            block = _pick_block()
            host, peer = list(block.hosts())
            self.host_address, self.client_address = str(host), str(peer)
            ns = ("ip", "netns", "exec", self.namespace)
            _run("ip", "netns", "add", self.namespace)
            _run("ip", "link", "add", self.host_interface, "type", "veth", "peer", "name",
                 self.peer_interface)
            _run("ip", "link", "set", self.peer_interface, "netns", self.namespace)
            _run("ip", "addr", "add", f"{host}/30", "dev", self.host_interface)
            _run("ip", "link", "set", self.host_interface, "up")
            _run(*ns, "ip", "addr", "add", f"{peer}/30", "dev", self.peer_interface)
            _run(*ns, "ip", "link", "set", self.peer_interface, "up")
            _run(*ns, "ip", "link", "set", "lo", "up")
            _run("tc", "qdisc", "add", "dev", self.host_interface, "root", "tbf", "rate",
                 self.rate, "burst", self.burst, *self._queue())
        except BaseException:
            self.close()
            raise
        return self

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program in the clients' namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def qdisc(self) -> dict[str, Any]:
        """The shaper's counters: bytes and packets sent, dropped, overlimits, requeues."""
        out = _run("tc", "-s", "qdisc", "show", "dev", self.host_interface, check=False).stdout
        found = _SENT.search(out)
        if not found:
            return {"raw": out.strip()}
        keys = ("sent_bytes", "sent_packets", "dropped", "overlimits", "requeues")
        return dict(zip(keys, map(int, found.groups()), strict=True))

    def describe(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "host_interface": self.host_interface,
                "peer_interface": self.peer_interface, "host_address": self.host_address,
                "client_address": self.client_address,
                "qdisc": f"tbf rate {self.rate} burst {self.burst} {' '.join(self._queue())}"}

    def _queue(self) -> tuple[str, str]:
        return ("limit", self.limit) if self.limit else ("latency", self.latency)

    def close(self) -> None:
        """Remove what exists of the link; every step tolerates its part being absent."""
        if not self._open:
            return
        _run("ip", "link", "del", self.host_interface, check=False)
        _run("ip", "netns", "del", self.namespace, check=False)
        self._open = False

    def __enter__(self) -> CappedLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale() -> list[str]:
    """Delete namespaces and host-side veths of this module whose process is gone."""
    removed = []
    names = _run("ip", "netns", "list", check=False).stdout.split()
    links = re.findall(rf"\d+: ({PREFIX_HOST}\d+)[@:]",
                       _run("ip", "-o", "link", "show", check=False).stdout)
    for name in [n for n in names if re.fullmatch(rf"{PREFIX_NS}\d+", n)] + links:
        pid = int(re.sub(r"\D", "", name))
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        if name.startswith(PREFIX_NS):
            _run("ip", "netns", "del", name, check=False)
        else:
            _run("ip", "link", "del", name, check=False)
        removed.append(name)
    return removed


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind, running every ``finally`` on the way (a
    BaseException, as KeyboardInterrupt is, so that no ``except Exception`` swallows it)."""


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (Ctrl-C already raises
    KeyboardInterrupt), so clean-ups run whichever way the script is stopped."""
    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
