"""The one CSV writer: every CSV the package writes goes through :func:`csv_text`.

Two things a plain ``csv.writer`` gets wrong with hostile text (file names, class names):

* **Formula injection.** A spreadsheet runs a cell that begins with ``=``, ``+``, ``-``
  or ``@`` (and, in some, a tab or carriage return) as a formula: a class named
  ``=HYPERLINK(...)`` or a file named ``-2+3.jpeg`` would become live. Such text cells get
  a leading ``'`` (OWASP's advice), and so does text that already begins with ``'``, so
  :func:`read_cell` can undo it exactly.
* **Carriage returns.** With ``lineterminator="\\n"`` the csv module leaves a ``\\r``
  inside a field unquoted, and the row breaks when read back. Every text field is quoted
  (``QUOTE_NONNUMERIC``), so any character survives the round trip.

Numbers are written as numbers (a negative probability difference stays ``-0.1``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Text beginning with one of these gets a leading "'" (the "'" itself: to stay reversible).
RISKY_START = ("=", "+", "-", "@", "\t", "\r", "'")


def write_cell(value: Any) -> Any:
    """``value`` as it goes into a CSV: text that a spreadsheet would run is defused."""
    if isinstance(value, str) and value.startswith(RISKY_START):
        return "'" + value
    return value


def read_cell(text: str) -> str:
    """Undo :func:`write_cell` on a text cell read back from one of our CSVs."""
    return text[1:] if text.startswith("'") else text


def csv_text(rows: Iterable[Mapping[str, Any] | Sequence[Any]], fieldnames: Sequence[str],
             *, header: bool = True) -> str:
    """Rows (mappings keyed by ``fieldnames``, or sequences in their order) as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    if header:
        writer.writerow([write_cell(name) for name in fieldnames])
    for row in rows:
        values = [row.get(name, "") for name in fieldnames] if isinstance(row, Mapping) \
            else list(row)
        writer.writerow([write_cell(v) for v in values])
    return buffer.getvalue()
