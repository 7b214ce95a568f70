"""An asyncio event loop in a thread of its own, for libraries that speak only asyncio.

Theory of operation
-------------------
nats-py, the official NATS client, runs on asyncio; the relay runs on Trio. Rather than run
every Trio task under an asyncio loop (``trio-asyncio``, which changes how the whole relay is
scheduled), the asyncio library gets a loop and a thread of its own, started and stopped by the
Trio task that uses it (:func:`asyncio_thread`, an async context manager: the thread lives no
longer than the nursery that owns the task). Trio awaits a coroutine there with
:meth:`AsyncioThread.run`: it is submitted with ``asyncio.run_coroutine_threadsafe``, and its
completion wakes the Trio task through the Trio token, so no Trio thread is held while waiting.
Cancelling the Trio side cancels the coroutine.

What crosses between the two threads is only what :meth:`run` returns (a batch of messages, an
acknowledgement): the hub and every other Trio object stay on Trio's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncioThread:
    """An asyncio loop running in a daemon thread (see the module's opening)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        # What a coroutine cancelled from the Trio side raises afterwards (a connection closed
        # under it) is nobody's business: logged for debugging, never printed as a traceback.
        self._loop.set_exception_handler(
            lambda loop, context: log.debug("asyncio: %s", context.get("message")))
        try:
            self._loop.run_forever()
        finally:
            # Whatever is still pending (a connection's reader) is cancelled, then the loop
            # closes: nothing of it outlives the thread.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` on the asyncio loop; its result, or its exception."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(function(*args), self._loop)  # type: ignore[arg-type]
        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the asyncio loop, without waiting for it."""
        self._loop.call_soon_threadsafe(function, *args)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await trio.to_thread.run_sync(self._thread.join)


@contextlib.asynccontextmanager
async def asyncio_thread(name: str) -> AsyncIterator[AsyncioThread]:
    """An :class:`AsyncioThread` for the body of the ``async with``; stopped on the way out."""
    thread = AsyncioThread(name)
    thread.start()
    try:
        yield thread
    finally:
        with trio.CancelScope(shield=True):
            await thread.stop()
