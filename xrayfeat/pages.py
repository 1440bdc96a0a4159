"""The small HTML pages (``index.html``) that link an output folder's figures."""

from __future__ import annotations

import html
from pathlib import Path

from xrayfeat.filenames import relative_href


PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.85em}
img{border:1px solid #ddd;max-width:100%}
td,th{padding:2px 8px;text-align:left}
.note{color:#555;font-size:.9em}"""


def figure_html(out: Path, path: Path, caption: str, width: int) -> str:
    href = relative_href(out, path)
    return (f'<figure><a href="{href}"><img src="{href}" width="{width}" alt="{html.escape(caption)}">'
            f"</a><figcaption>{html.escape(caption)}</figcaption></figure>")


def page_html(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
