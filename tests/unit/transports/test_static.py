"""Plain HTTP answers (as upstream's), without sockets."""

from __future__ import annotations

import contextlib
import html
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.transports import static


def test_hello_web_for_every_path_and_method() -> None:
    for method, target in ((b"GET", b"/"), (b"POST", b"/x/y?z")):
        reply = static.answer(None, method, target, None)
        assert (reply.status, reply.body) == (200, b"Hello, Web!")
        assert (b"content-type", b"text/plain; charset=utf-8") in reply.headers


def test_files_index_listing_404_and_etag(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b.txt").write_text("x")
    root = str(tmp_path)

    index = static.answer(root, b"GET", b"/", None)
    assert index.status == 200 and index.file == str(tmp_path / "index.html")
    assert dict(index.headers)[b"content-type"].startswith(b"text/html")

    script = static.answer(root, b"GET", b"/app.js", None)
    assert script.length == 1 and b"javascript" in dict(script.headers)[b"content-type"]

    spaced = static.answer(root, b"GET", b"/sub/a%20b.txt", None)
    assert spaced.status == 200

    listing = static.answer(root, b"GET", b"/sub", None)
    assert listing.status == 200 and b"a b.txt" in listing.body

    assert static.answer(root, b"GET", b"/missing", None).status == 404
    assert static.answer(root, b"GET", b"/../../etc/passwd", None).status == 404
    assert static.answer(root, b"GET", b"/%2e%2e/%2e%2e/etc/passwd", None).status == 404
    assert static.answer(root, b"DELETE", b"/", None).status == 405

    etag = dict(script.headers)[b"etag"]
    assert static.answer(root, b"GET", b"/app.js", etag).status == 304


# -- security review: dot segments, links out of the root, odd targets ---------------------------

NOT_FOUND = (404, b"File not found")


def _inside(root: Path, reply: static.Reply) -> bool:
    """The file of ``reply``, links followed, lies inside ``root`` with no dot segment below."""
    assert reply.file is not None
    relative = Path(os.path.realpath(reply.file)).relative_to(os.path.realpath(root))
    return not any(part.startswith(".") for part in relative.parts)


def _answer(reply: static.Reply) -> tuple[int, bytes]:
    return reply.status, reply.body


def _hrefs(body: bytes) -> list[str]:
    return [unquote(href) for href in re.findall(r'href="([^"]*)"', body.decode())]


def test_dot_segments_are_refused_and_never_listed(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".git").mkdir()
    (tmp_path / "sub" / ".git" / "config").write_text("[core]")
    (tmp_path / "sub" / ".hidden.txt").write_text("x")
    (tmp_path / "sub" / "shown.txt").write_text("x")
    (tmp_path / "index.html").write_text("<p>hi</p>")
    (tmp_path / "git").symlink_to(".git")  # A link inside the root to a dot directory.
    root = str(tmp_path)

    for target in (b"/.env", b"/%2eenv", b"/%2Eenv", b"/.git/", b"/.git/config",
                   b"/%2egit/config", b"/sub/.git/config", b"/sub/.hidden.txt", b"/git/config",
                   b"/.", b"/sub/..", b"/sub/../index.html", b"/sub/%2e%2e/index.html",
                   b"/sub%2f..%2f.env"):
        for method in (b"GET", b"HEAD"):
            reply = static.answer(root, method, target, None)
            assert (*_answer(reply), reply.file) == (*NOT_FOUND, None), target

    (tmp_path / "index.html").unlink()
    listing = static.answer(root, b"GET", b"/", None)
    assert listing.status == 200 and _hrefs(listing.body) == ["/sub"]
    sub = static.answer(root, b"GET", b"/sub/", None)
    assert _hrefs(sub.body) == ["/sub/shown.txt"] and b"hidden" not in sub.body
    assert static.answer(root, b"GET", b"/sub/shown.txt", None).status == 200


def test_index_file_linked_out_of_the_root_is_not_served(tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0")
    www = tmp_path / "www"
    (www / "out").mkdir(parents=True)
    (www / "out" / "index.html").symlink_to(secret)
    (www / "out" / "index.htm").symlink_to(secret)
    (www / "in").mkdir()
    (www / "page.html").write_text("<p>page</p>")
    (www / "in" / "index.html").symlink_to("../page.html")
    (www / "secret.txt").symlink_to(secret)
    (www / "outdir").symlink_to(secret.parent, target_is_directory=True)
    root = str(www)

    escaped = static.answer(root, b"GET", b"/out/", None)
    # No index inside the root: the listing, without the links that lead out of it.
    assert (escaped.status, escaped.file) == (200, None) and _hrefs(escaped.body) == []
    inside = static.answer(root, b"GET", b"/in", None)
    assert inside.status == 200 and inside.file == os.path.realpath(www / "page.html")
    assert dict(inside.headers)[b"content-type"].startswith(b"text/html")
    for target in (b"/secret.txt", b"/outdir/secret", b"/outdir/"):
        assert static.answer(root, b"GET", target, None).status == 404, target
    assert _hrefs(static.answer(root, b"GET", b"/", None).body) == ["/in", "/out", "/page.html"]


def test_odd_targets_answer_400_or_404(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    root = str(tmp_path)
    for target in (b"/%00", b"/file.txt%00", b"/a%00/b", b"/%zz", b"/%4", b"/%", b"*", b"",
                   b"file.txt", b"ftp:/file.txt"):
        reply = static.answer(root, b"GET", target, None)
        assert _answer(reply) == (400, b"Bad Request"), target
    for target in (b"/%ff%fe", b"/\xff\xfe", b"/" + b"a" * 300, b"/a" * 3000,
                   b"/" + b"a/" * 1000 + b"file.txt", b"/file.txt/x", b"/file.txt%2f",
                   b"http://x/etc/passwd"):
        reply = static.answer(root, b"GET", target, None)
        assert _answer(reply) == NOT_FOUND, target
    for target in (b"http://x/file.txt", b"https://x:1/file.txt?q=%00", b"/file.txt?%zz",
                   b"//file.txt", b"/file%2etxt"):
        reply = static.answer(root, b"GET", target, None)
        assert reply.file == str(tmp_path / "file.txt"), target
    listing = static.answer(root, b"GET", b"/", None).body
    assert static.answer(root, b"GET", b"HTTP://x", None).body == listing


def test_special_files_are_never_served(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "index.html")  # Opening it would block until a writer came.
    (tmp_path / "loop").symlink_to("loop")
    os.mknod(tmp_path / "socket", stat.S_IFSOCK | 0o600)  # Needs no privilege, unlike devices.
    # Without CAP_MKNOD, the FIFO and the socket stand for every special file.
    with contextlib.suppress(PermissionError):
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    root = str(tmp_path)
    for target in (b"/fifo", b"/socket", b"/null", b"/loop", b"/loop/x", b"/dir/index.html"):
        assert _answer(static.answer(root, b"GET", target, None)) == NOT_FOUND, target
    assert _hrefs(static.answer(root, b"GET", b"/", None).body) == ["/dir"]
    assert static.answer(root, b"GET", b"/dir", None).file is None


def test_unreadable_directory_answers_404(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    (tmp_path / "locked").mkdir()
    locked = str(tmp_path / "locked")
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(real):  # Root reads any directory, so mode 000 alone cannot show the refusal.
        def call(path=".", *args):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real(path, *args)
        return call

    monkeypatch.setattr(os, "scandir", refuse(real_scandir))
    monkeypatch.setattr(os, "listdir", refuse(real_listdir))
    assert _answer(static.answer(str(tmp_path), b"GET", b"/locked/", None)) == NOT_FOUND


def test_listing_escapes_names_and_links_to_them(tmp_path: Path) -> None:
    (tmp_path / '<b>&"x.txt').write_text("x")
    (tmp_path / "a b#?.txt").write_text("x")
    (tmp_path / os.fsdecode(b"\xff.txt")).write_text("x")
    listing = static.answer(str(tmp_path), b"GET", b"/", None)
    assert b"&lt;b&gt;&amp;&quot;x.txt</a>" in listing.body
    assert b'href="/a%20b%23%3F.txt"' in listing.body and b'href="/%FF.txt"' in listing.body
    assert "\ufffd.txt</a>".encode() in listing.body
    for href in re.findall(rb'href="([^"]*)"', listing.body):
        assert static.answer(str(tmp_path), b"GET", html.unescape(href.decode()).encode(),
                             None).status == 200, href


def test_listing_shows_links_that_stay_inside_the_root_and_hides_the_others(
        tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b.txt").write_text("x")
    (tmp_path / "sub" / "dir").mkdir()
    (tmp_path / "sub" / "to-file").symlink_to(tmp_path / "sub" / "a b.txt")
    (tmp_path / "sub" / "to-dir").symlink_to(tmp_path / "sub" / "dir")
    (tmp_path / "sub" / "out").symlink_to("/etc/passwd")
    (tmp_path / "sub" / "dangling").symlink_to(tmp_path / "missing")
    listing = static.answer(str(tmp_path), b"GET", b"/sub/", None)
    assert (listing.status, dict(listing.headers)[b"content-type"]) == (
        200, b"text/html; charset=utf-8")
    assert listing.length == len(listing.body)
    assert re.findall(rb'href="([^"]*)"', listing.body) == [
        b"/sub/a%20b.txt", b"/sub/dir", b"/sub/to-dir", b"/sub/to-file"]
    assert b"<title>/sub</title>" in listing.body and b"</li><li>" in listing.body
    (tmp_path / "sub" / "dir" / "x").write_text("x")
    nested = static.answer(str(tmp_path), b"GET", b"/sub/dir", None)
    assert b"<title>/sub/dir</title>" in nested.body and b'href="/sub/dir/x"' in nested.body


def test_text_replies_carry_their_length_and_the_405_its_text() -> None:
    for reply in (static.answer(None, b"GET", b"/", None),
                  static.answer("/", b"POST", b"/", None)):
        assert reply.length == len(reply.body) > 0
    assert static.answer("/", b"PUT", b"/", None).body == b"Method Not Allowed"


def test_unknown_types_are_octet_streams_and_etags_match_in_any_list(tmp_path: Path) -> None:
    (tmp_path / "blob.unknownext").write_text("x")
    reply = static.answer(str(tmp_path), b"GET", b"/blob.unknownext", None)
    assert dict(reply.headers)[b"content-type"] == b"application/octet-stream"
    etag = dict(reply.headers)[b"etag"]
    not_modified = static.answer(str(tmp_path), b"GET", b"/blob.unknownext", b'"other",' + etag)
    assert (not_modified.status, dict(not_modified.headers)[b"etag"]) == (304, etag)
    (tmp_path / "notes.txt").write_text("x")
    assert dict(static.answer(str(tmp_path), b"GET", b"/notes.txt", None).headers)[
        b"content-type"] == b"text/plain; charset=utf-8"
    assert static.answer(str(tmp_path), b"GET", b"/blob.unknownext", b'"other"').status == 200


def test_the_type_comes_from_the_requested_name_not_a_link_target(tmp_path: Path) -> None:
    # As wai-app-static: the URL's extension decides, wherever a link inside the root points.
    (tmp_path / "page.txt").write_text("<p>hi</p>")
    (tmp_path / "page.html").symlink_to("page.txt")
    reply = static.answer(str(tmp_path), b"GET", b"/page.html", None)
    assert (reply.status, reply.file) == (200, str(tmp_path / "page.txt"))
    assert dict(reply.headers)[b"content-type"] == b"text/html; charset=utf-8"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "index.htm").symlink_to("../page.txt")
    index = static.answer(str(tmp_path), b"GET", b"/dir/", None)
    assert dict(index.headers)[b"content-type"] == b"text/html; charset=utf-8"


def test_a_path_of_path_max_bytes_is_served_and_one_byte_more_is_not(tmp_path: Path) -> None:
    # The cap is on the decoded path, inclusive; repeated slashes count, then collapse.
    (tmp_path / "a").write_text("x")
    longest = b"/" * 4095 + b"a"
    assert static.answer(str(tmp_path), b"GET", longest, None).status == 200
    assert static.answer(str(tmp_path), b"GET", b"/" + longest, None).status == 404


# -- property: whatever the target, a reply; a file only inside the root -------------------------

#: Pieces that make targets interesting: separators, dots, escapes, links, special files.
PIECES = [b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%00", b"%ff", b"%", b"%4", b"?", b"#",
          b"*", b"http://x", b".env", b".git", b"config", b"sub", b"index.html", b"out",
          b"in", b"git", b"fifo", b"loop", b"page.html", b"\xff", b"a" * 300]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root full of traps, built once for every example."""
    base = tmp_path_factory.mktemp("static")
    (base / "secret").write_text("root:x:0:0")
    www = base / "www"
    (www / "sub" / ".git").mkdir(parents=True)
    (www / "sub" / ".git" / "config").write_text("[core]")
    (www / ".git").mkdir()
    (www / ".git" / "config").write_text("[core]")
    (www / ".env").write_text("SECRET=1")
    (www / "page.html").write_text("<p>page</p>")
    (www / "sub" / "index.html").symlink_to(base / "secret")
    (www / "out").symlink_to(base, target_is_directory=True)
    (www / "in").mkdir()
    (www / "in" / "index.html").symlink_to("../page.html")
    (www / "git").symlink_to(".git")
    (www / "loop").symlink_to("loop")
    os.mkfifo(www / "fifo")
    return www


@settings(deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.sampled_from(PIECES), max_size=12).map(lambda p: b"/" + b"".join(p))),
       st.sampled_from([b"GET", b"HEAD"]))
def test_any_target_gets_a_reply_and_only_files_inside_the_root(
        tree: Path, target: bytes, method: bytes) -> None:
    reply = static.answer(str(tree), method, target, None)
    assert isinstance(reply, static.Reply) and reply.status in (200, 400, 404)
    if reply.file is not None:
        assert _inside(tree, reply) and os.path.isfile(reply.file)
        assert Path(reply.file).read_text() != "root:x:0:0"
    for href in _hrefs(reply.body) if reply.status == 200 else []:
        assert not any(part.startswith(".") for part in href.split("/")), href


def test_traversal_in_every_spelling_answers_404(tmp_path: Path) -> None:
    """Kept from the review's "checked and fine": encoded, double-encoded, backslash and
    absolute-form traversal."""
    (tmp_path / "app.js").write_text("1")
    root = str(tmp_path)
    for target in (b"/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd",
                   b"/%252e%252e/%252e%252e/etc/passwd", b"/..%5c..%5cetc%5cpasswd",
                   b"/..\\..\\etc\\passwd", b"http://x/../../etc/passwd",
                   b"http://x/%2e%2e/etc/passwd", b"/app.js/../../../etc/passwd"):
        assert static.answer(root, b"GET", target, None).status in (400, 404), target
