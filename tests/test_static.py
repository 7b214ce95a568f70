"""Plain HTTP answers (spec 2.2), without sockets."""

from __future__ import annotations

from pathlib import Path

from relay import static


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
