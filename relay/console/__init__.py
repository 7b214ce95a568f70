"""The live console: a static page (``index.html``, ``console.js``, ``console.css``) shipped as
package data, served by the relay itself when ``PGWS_ROOT_PATH`` points at this directory.

This module owns only the directory's location (:data:`DIRECTORY`); ``python -m relay.console``
prints it, for ``PGWS_ROOT_PATH=$(python -m relay.console) pgws-relay``. It never imports the
relay, reads a setting or serves anything: serving is :mod:`relay.transports.static`'s job, and the
page
talks to the relay only over WebSocket, as any client would.
"""

from __future__ import annotations

from pathlib import Path

#: Absolute path of the console's files (the page is ``index.html``, served for ``/``).
DIRECTORY: Path = Path(__file__).resolve().parent
