"""Output file names made from input paths: safe on every file system, unique, inside
their folder.

A radiograph's file name becomes part of its output names (``<stem>_gradcam.png``); a name
from outside may hold path separators, reserved Windows names, control characters or
bytes that are not UTF-8, and two inputs may share a stem. Leaf module: no package imports
but errors.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from xrayfeat.errors import UsageError


MAX_STEM_BYTES = 96  # leaves room for "_d4_block2_conv2.png" under the 255-byte name limit


_FORBIDDEN = set('/\\:*?"<>|')


_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def safe_component(text: str, fallback: str = "image") -> str:
    """``text`` made into one safe file-name component (no extension handling)."""
    text = unicodedata.normalize("NFC", str(text))
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        # C*: control, format (bidi overrides), surrogates, private, unassigned;
        # Z*: spaces and line/paragraph separators (U+2028, U+2029).
        chars.append("_" if ch in _FORBIDDEN or category[0] in "CZ" else ch)
    name = "".join(chars)
    name = re.sub(r"\.{2,}", ".", name)  # never ".."
    name = re.sub(r"_{2,}", "_", name)
    name = name.strip("._- ")  # no hidden files, no "-option" names, no trailing dots
    encoded = name.encode("utf-8")[:MAX_STEM_BYTES]
    name = encoded.decode("utf-8", errors="ignore").strip("._- ")
    if not name:
        return fallback
    head, dot, rest = name.partition(".")
    if head.upper() in _WINDOWS_RESERVED:
        # "CON.x" is reserved too: mark the device name itself, within the byte budget.
        rest = (dot + rest).encode("utf-8")[: MAX_STEM_BYTES - len(head) - 1]
        name = f"{head}_{rest.decode('utf-8', errors='ignore')}"
    return name


def safe_stem(path: str | os.PathLike) -> str:
    """A file-name-safe stem for an input path: its last component without the extension.

    Separators (``/`` and ``\\``), control and format characters, line separators and
    whitespace become ``_``; ``..`` cannot survive, nor a leading dot or dash; non-ASCII
    letters are kept; the result is at most :data:`MAX_STEM_BYTES` UTF-8 bytes and never
    empty. Use :func:`unique_stems` for several paths at once.
    """
    name = re.split(r"[/\\]", os.fspath(path))[-1]
    stem, dot, _ = name.rpartition(".")
    if not dot or not stem.strip("."):
        stem = name
    return safe_component(stem)


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`safe_stem` of each path, made unique (ignoring case) within the list.

    Stems that collide get ``_`` and 8 hex digits of a hash of the full path; a path given
    twice gets ``_2``, ``_3``...
    """
    stems = [safe_stem(p) for p in paths]
    groups: dict[str, set[str]] = {}
    for p, s in zip(paths, stems):
        groups.setdefault(s.casefold(), set()).add(os.fspath(p))
    out, seen = [], set()
    for p, s in zip(paths, stems):
        if len(groups[s.casefold()]) > 1:
            digest = hashlib.sha1(os.fsencode(os.fspath(p))).hexdigest()[:8]
            s = f"{s}_{digest}"
        candidate, k = s, 1
        while candidate.casefold() in seen:
            k += 1
            candidate = f"{s}_{k}"
        seen.add(candidate.casefold())
        out.append(candidate)
    return out


def inside(out: Path, name: str) -> Path:
    """``out / name``, checked to stay inside ``out`` (defence in depth)."""
    target = out / name
    if target.resolve().parent != out.resolve():
        raise UsageError(f"refusing to write {name!r} outside {out}")
    return target


def shorten(path: str | os.PathLike, limit: int = 60) -> str:
    """A path's name for a figure title: printable, at most ``limit`` characters."""
    name = "".join(c if unicodedata.category(c)[0] not in "CZ" or c == " " else "?"
                   for c in Path(os.fspath(path)).name)
    return name if len(name) <= limit else name[: limit - 3] + "..."


def relative_href(out: Path, path: Path) -> str:
    return quote(path.relative_to(out).as_posix())
