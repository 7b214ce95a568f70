"""Log lines on stderr: readable text, or one JSON object per line for a log collector.

Theory of operation
-------------------
:func:`configure` installs one stderr handler on the root logger, once, at start-up. Text
(``PGWS_LOG_FORMAT=text``, the default) is the format the relay always had: ``asctime level
logger: message``, with ``[worker N]`` after the time in a worker process. JSON
(``PGWS_LOG_FORMAT=json``) is :class:`JsonFormatter`: one object per event with ``time``
(ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message`` (the formatted message),
``worker`` in a worker process, every field a caller passed with ``extra=``, and ``exc_info``
(the traceback as one string) when there is one.

Rules this module keeps:

- One event, one line: JSON escapes the newlines of a message or a traceback.
- Formatting never raises (a failing handler would print a traceback, not JSON): a field that
  orjson cannot encode is written as its ``str()``.
- It writes what callers give it and adds nothing: keeping tokens and secrets out of messages
  and ``extra=`` fields is the callers' rule (they log peers, channels and counts, never a
  request target or a header).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

#: The text format, unchanged from the relay's first release: operators grep it.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The JSON keys the formatter sets itself; an ``extra=`` field of the same name cannot
#: replace one (the event's own time or level must stay trustworthy), so it is skipped.
_OWN_KEYS = ("time", "level", "logger", "message", "worker", "exc_info", "stack_info")

#: Attributes every LogRecord has (plus those Formatter.format adds): everything else on a
#: record came from ``extra=`` and is an event field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}

#: Non-string dict keys (an int, say) are written as strings instead of failing the event.
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds, as collectors parse without configuration."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _encodable(value: Any) -> Any:
    """``value`` if orjson can write it, else its ``str()`` (an int beyond 64 bits, say)."""
    try:
        orjson.dumps(value, default=str, option=_DUMPS_OPTIONS)
    except (TypeError, ValueError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module's docstring for the keys."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:
            # A call with arguments that do not fit its format: keep the event, not a
            # traceback. The arguments are left out: they were meant to be formatted, not shown.
            message = str(record.msg)
        document: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if self._worker is not None:
            document["worker"] = self._worker
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in _OWN_KEYS:
                document[name] = value
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exc_info"] = record.exc_text
        if record.stack_info:
            document["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(document, default=str, option=_DUMPS_OPTIONS).decode()
        except (TypeError, ValueError):
            # One field orjson refuses even through str() (an int over 64 bits): find it.
            document = {name: _encodable(value) for name, value in document.items()}
            return orjson.dumps(document, default=str, option=_DUMPS_OPTIONS).decode()


def text_format(worker: int | None) -> str:
    """The text format, with the worker's index after the time in a worker process."""
    if worker is None:
        return TEXT_FORMAT
    return f"%(asctime)s [worker {worker}] %(levelname)s %(name)s: %(message)s"


def configure(level: str, form: str, worker: int | None = None) -> None:
    """Send log records of ``level`` and above to stderr, as ``form`` (``text`` or ``json``).

    ``worker``: the index of this worker process (``PGWS_WORKER_INDEX``), None otherwise.
    Replaces any handler already on the root logger, so it can be called again (tests).
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(worker) if form == "json" else logging.Formatter(
        text_format(worker))
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
