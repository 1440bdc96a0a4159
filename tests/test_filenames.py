"""xrayfeat.filenames: output names from any input path stay safe, unique and inside their folder."""

from __future__ import annotations


import pytest

from xrayfeat import filenames
from xrayfeat.filenames import safe_stem, unique_stems

# --------------------------------------------------------------------------- safe names

@pytest.mark.parametrize("name", [
    "..\u2028evil.jpeg", "../../etc/passwd", "..\\..\\evil.jpeg", "....jpeg", ".hidden.png",
    "-rf.jpeg", "a\x00b\x1f.jpeg", "\u202eexe.gpj.jpeg", "CON.jpeg", " ", "..", ".",
    "x" * 400 + ".jpeg", "é" * 300 + ".png",
])
def test_safe_stem_cannot_escape(name, tmp_path):
    stem = safe_stem(name)
    assert stem and "/" not in stem and "\\" not in stem and ".." not in stem
    assert not stem.startswith((".", "-"))
    assert all(ch.isprintable() and not ch.isspace() for ch in stem), repr(stem)
    assert len(stem.encode("utf-8")) <= filenames.MAX_STEM_BYTES
    assert (tmp_path / stem).resolve().parent == tmp_path.resolve()
    assert stem.split(".")[0].upper() != "CON"


def test_safe_stem_keeps_readable_names():
    assert safe_stem("/data/x/person1_bacteria_1.jpeg") == "person1_bacteria_1"
    assert safe_stem("Röntgen Thorax 2.png") == "Röntgen_Thorax_2"
    assert safe_stem("C:\\scans\\IM-0001.dcm") == "IM-0001"
    assert safe_stem("noextension") == "noextension"


def test_unique_stems_dedupes_with_path_hash():
    paths = ["a/img.jpeg", "b/img.jpeg", "b/IMG.png", "c/other.jpeg", "a/img.jpeg"]
    stems = unique_stems(paths)
    assert len({s.casefold() for s in stems}) == len(stems)
    assert stems[3] == "other"
    assert all(s.startswith(("img_", "IMG_")) for s in stems[:3])
    assert stems[:3] == unique_stems(paths[:3])  # stable: a hash of the path, not an order
    assert stems[4] == stems[0] + "_2"


