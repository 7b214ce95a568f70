"""Plain HTTP answers: ``Hello, Web!``, or static files from ``PGWS_ROOT_PATH``.

Theory of operation
-------------------
:func:`answer` maps a request (method, raw target, If-None-Match) to a :class:`Reply`: status,
headers and either a body or a file to stream. It follows upstream's wai-app-static file-server
settings: MIME type by the requested name's extension, ``index.html`` then ``index.htm`` for a
directory, an HTML listing when there is neither, an ETag, ``404 File not found``.

The target's path (origin-form, or the path of an absolute-form target) is percent-decoded and
split at ``/``; a segment's decoded bytes are the file name's bytes. An escaped ``/`` (``%2F``)
answers 404, so decoding never makes a separator (WAI splits before decoding and wai-app-static
refuses a segment holding ``/``). Rules kept for any target:

- **No dot segments.** A segment starting with ``.`` (``.env``, ``%2egit``, ``..``) answers 404,
  and a listing never shows such a name. (Upstream answers 403 ``Forbidden`` to such a request
  and hides them from its listings too.)
- **Every file inside the root.** The file to serve (an index file too) and a directory to list
  are resolved, links followed, and must lie inside the resolved root with no dot segment below
  it; a file must be a regular file we can read, never a FIFO or a device. Links that stay
  inside the root work; a listing shows only names that would be served.
- **Never raises.** A target that names no path (a NUL, a malformed ``%`` escape, ``*``) answers
  ``400 Bad Request``; a file-system error (permissions, a link loop, a name too long) answers
  404.

It runs in the event loop, so it stays cheap: a few ``stat`` calls per request (the path's
length is capped, which bounds the work of resolving it) and one directory scan for a listing.
It opens no file (the server does, after sending the head) and never touches a socket.
"""

from __future__ import annotations

import dataclasses
import html
import mimetypes
import os
import re
import stat
from urllib.parse import quote, unquote_to_bytes

HELLO = b"Hello, Web!"
_INDEX_FILES = ("index.html", "index.htm")
_TEXT_PLAIN = b"text/plain; charset=utf-8"
#: Linux's PATH_MAX: no longer path can be opened, so a longer one is refused before it costs
#: work per segment in the event loop.
_MAX_PATH_BYTES = 4096
#: A ``%`` must begin two hex digits (RFC 3986 2.1); anything else is malformed, not a name.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: A segment starting with a dot: hidden by convention (.env, .git) or a relative step (. ..).
_DOT_SEGMENT = re.compile(rb"/\.")
#: A NUL, raw or escaped.
_NUL = re.compile(rb"\x00|%00")
#: An escaped "/", case-insensitive like every escape.
_ENCODED_SLASH = re.compile(rb"%2[fF]")
#: Scheme and authority of an absolute-form target, which a server must accept
#: (RFC 9112 3.2.2); the path after them is served like an origin-form one.
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/]*")


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    #: A file to stream as the body instead of ``body``: resolved, so it holds no link.
    file: str | None = None
    length: int = 0


def _text(status: int, body: bytes) -> Reply:
    return Reply(status, [(b"content-type", _TEXT_PLAIN)], body, length=len(body))


def _not_found() -> Reply:
    return _text(404, b"File not found")


def _path(target: bytes) -> bytes | None:
    """The raw path of an origin-form or absolute-form ``target``; None for any other form."""
    path = target.partition(b"?")[0]
    absolute = _ABSOLUTE_FORM.match(path)
    if absolute:
        path = path[absolute.end():] or b"/"
    return path if path.startswith(b"/") else None


def _resolve(real_root: str, path: str) -> tuple[str, os.stat_result] | None:
    """``path`` with its links followed, and its status, if it exists inside the root with no
    dot segment below the root; else None."""
    if not os.path.exists(path):
        return None  # One system call settles a miss; realpath would spend one per segment.
    resolved = os.path.realpath(path)
    if os.path.commonpath([real_root, resolved]) != real_root:
        return None
    if any(part.startswith(".") for part in resolved[len(real_root):].split(os.sep)):
        return None  # A link inside the root to a dot file or directory (.git, .env).
    try:
        return resolved, os.stat(resolved)
    except OSError:
        return None


def _file(found: tuple[str, os.stat_result] | None) -> tuple[str, os.stat_result] | None:
    """``found`` if it is a regular file we may read, else None."""
    # Not a FIFO (opening it would block), nor a device (it could stream without end).
    if found is not None and stat.S_ISREG(found[1].st_mode) and os.access(found[0], os.R_OK):
        return found
    return None


def _display(name: str) -> str:
    # A name that is not UTF-8 (surrogate-escaped by os.fsdecode) is shown with U+FFFD.
    return os.fsencode(name).decode("utf-8", "replace")


def _listing(real_root: str, directory: str, names: list[str]) -> Reply:
    """An HTML page linking every entry of ``directory`` that would be served."""
    shown = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                found = _resolve(real_root, entry.path)
                if not (_file(found) or (found and stat.S_ISDIR(found[1].st_mode))):
                    continue
            elif not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
                continue
            shown.append(entry.name)
    base = "".join(f"/{quote(os.fsencode(name), safe='')}" for name in names)
    title = html.escape("/" + "/".join(_display(name) for name in names))
    items = "".join(
        f'<li><a href="{html.escape(base + "/" + quote(os.fsencode(name), safe=""))}">'
        f"{html.escape(_display(name))}</a></li>" for name in sorted(shown))
    body = (f"<!DOCTYPE html><html><head><title>{title}</title></head>"
            f"<body><h1>{title}</h1><ul>{items}</ul></body></html>").encode()
    return Reply(200, [(b"content-type", b"text/html; charset=utf-8"), *_FRAMING], body,
                 length=len(body))


#: Sent with every file and listing: no other site may frame a page the relay serves (the
#: console holds a token and sends messages: a framing site could trick a user into clicks,
#: and a page's own <meta> CSP cannot say frame-ancestors), and no browser guesses a type.
_FRAMING = ((b"content-security-policy", b"frame-ancestors 'none'"),
            (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"))


def _serve(real_root: str, names: list[str], if_none_match: bytes | None) -> Reply:
    found = _resolve(real_root, os.path.join(real_root, "/".join(names)))
    if found is None:
        return _not_found()
    name = names[-1] if names else os.path.basename(found[0])
    if stat.S_ISDIR(found[1].st_mode):
        directory = found[0]
        for index in _INDEX_FILES:
            found = _file(_resolve(real_root, os.path.join(directory, index)))
            if found:
                name = index
                break
        else:
            return _listing(real_root, directory, names)
    found = _file(found)
    if found is None:
        return _not_found()
    path, info = found
    etag = f'"{info.st_size:x}-{info.st_mtime_ns:x}"'.encode()
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    headers = [(b"content-type", content_type.encode()), (b"etag", etag), *_FRAMING]
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(b",")):
        return Reply(304, headers)
    return Reply(200, headers, file=path, length=info.st_size)


def answer(root: str | None, method: bytes, target: bytes, if_none_match: bytes | None) -> Reply:
    """The reply to a plain (non-WebSocket) HTTP request; never raises."""
    if root is None:
        return _text(200, HELLO)
    if method not in (b"GET", b"HEAD"):
        return _text(405, b"Method Not Allowed")
    path = _path(target)
    # No file name holds a NUL (the OS raises ValueError for one, not an error code).
    if path is None or _BAD_ESCAPE.search(path) or _NUL.search(path):
        return _text(400, b"Bad Request")
    # A %2F decodes to a separator smuggled inside a name, which upstream refuses too. An
    # escape is three bytes for one, so a raw path this long cannot decode within PATH_MAX.
    if _ENCODED_SLASH.search(path) or len(path) > 3 * _MAX_PATH_BYTES:
        return _not_found()
    decoded = unquote_to_bytes(path)
    if len(decoded) > _MAX_PATH_BYTES or _DOT_SEGMENT.search(decoded):
        return _not_found()
    # os.fsdecode maps any bytes to a name the OS maps back to the same bytes; "/" stays "/".
    names = [name for name in os.fsdecode(decoded).split("/") if name]
    try:
        return _serve(os.path.realpath(root), names, if_none_match)
    except (OSError, ValueError):
        # The file system refused or changed under us (a directory we may not read, a link
        # loop, a name too long, an entry gone): there is nothing to serve.
        return _not_found()
