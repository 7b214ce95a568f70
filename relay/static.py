"""Plain HTTP answers: ``Hello, Web!``, or static files from ``PGWS_ROOT_PATH``.

Theory of operation
-------------------
:func:`answer` maps a request (method, raw target, If-None-Match) to a :class:`Reply`: status,
headers and either a body or a file to stream. It follows upstream's wai-app-static settings:
MIME type by extension, ``index.html`` then ``index.htm`` for a directory, an HTML listing when
there is neither, an ETag, ``404 File not found``. Paths are percent-decoded and must stay
inside the root (``..`` and symbolic links out of it answer 404).

It reads the file system (stat, directory listings); it never touches a socket.
"""

from __future__ import annotations

import dataclasses
import html
import mimetypes
import os
from urllib.parse import unquote

HELLO = b"Hello, Web!"
_INDEX_FILES = ("index.html", "index.htm")
_TEXT_PLAIN = b"text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    #: A file to stream as the body instead of ``body``.
    file: str | None = None
    length: int = 0


def _text(status: int, body: bytes) -> Reply:
    return Reply(status, [(b"content-type", _TEXT_PLAIN)], body, length=len(body))


def _listing(directory: str, url_path: str) -> Reply:
    base = url_path if url_path.endswith("/") else url_path + "/"
    names = sorted(os.listdir(directory))
    items = "".join(
        f'<li><a href="{html.escape(base + name)}">{html.escape(name)}</a></li>' for name in names
    )
    body = (f"<!DOCTYPE html><html><head><title>{html.escape(url_path)}</title></head>"
            f"<body><h1>{html.escape(url_path)}</h1><ul>{items}</ul></body></html>").encode()
    return Reply(200, [(b"content-type", b"text/html; charset=utf-8")], body, length=len(body))


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def answer(root: str | None, method: bytes, target: bytes, if_none_match: bytes | None) -> Reply:
    """The reply to a plain (non-WebSocket) HTTP request."""
    if root is None:
        return _text(200, HELLO)
    if method not in (b"GET", b"HEAD"):
        return _text(405, b"Method Not Allowed")
    url_path = unquote(target.decode("latin-1").partition("?")[0])
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, url_path.lstrip("/")))
    if not _inside(real_root, path) or "\x00" in url_path:
        return _text(404, b"File not found")
    if os.path.isdir(path):
        for name in _INDEX_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            return _listing(path, url_path)
    try:
        info = os.stat(path)
    except OSError:
        return _text(404, b"File not found")
    if not os.path.isfile(path):
        return _text(404, b"File not found")
    etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}"'.encode()
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    headers = [(b"content-type", content_type.encode()), (b"etag", etag)]
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(b",")):
        return Reply(304, headers)
    return Reply(200, headers, file=path, length=info.st_size)
