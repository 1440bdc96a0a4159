"""Checks shared by the tests of figure-writing modules: real PNGs, and HTML pages whose
links all resolve inside their folder."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def linked_files(index: Path) -> set[Path]:
    """Every file index.html links to, resolved, checked to lie inside its folder."""
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    root = index.parent.resolve()
    files = set()
    for href in parser.hrefs:
        target = (index.parent / unquote(href)).resolve()
        assert target.is_relative_to(root), href
        assert target.is_file(), href
        files.add(target)
    return files


def assert_nonblank_png(path: Path) -> None:
    assert path.suffix == ".png" and path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 10, f"{path} looks blank"


def pngs_under(folder: Path) -> set[Path]:
    return {p.resolve() for p in folder.rglob("*.png")}
