"""A report as a list of sections, written both as self-contained HTML and as markdown."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE = """mark{background:#cfc}pre{white-space:pre-wrap;background:#fafafa;padding:6px}
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:12px;max-width:100%}
td,th{border:1px solid #ccc;padding:3px 4px;text-align:right}td{white-space:nowrap}
th{font-weight:600;overflow-wrap:break-word;hyphens:auto}.table{max-width:100%;overflow-x:auto}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.verdict{background:#f7f7ff;border-left:4px solid #66c;padding:4px 10px;margin:4px 0}"""


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e9:  # FLOPs and the like: 3.1e+13 reads where 31,000,000,000,000 widens a table
            return f"{value:.3g}"
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] | None = None
    images: list[tuple[str, str]] = field(default_factory=list)  # (caption, base64 png)
    raw_html: list[str] = field(default_factory=list)  # already-escaped HTML (HTML output only)


def _table_html(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<div class='table'><table><tr>{head}</tr>{body}</table></div>"


def _table_md(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, sections: list[Section], stem: str = "report") -> Path:
    """Write `<stem>.html` (plots embedded) and `<stem>.md` into out_dir; returns the HTML path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        for t in s.text:
            parts.append(f"<p>{html.escape(t)}</p>")
            md += [t, ""]
        for v in s.verdicts:
            parts.append(f"<div class='verdict'>{html.escape(v)}</div>")
            md += [f"- {v}"]
        if s.verdicts:
            md.append("")
        if s.table:
            parts.append(_table_html(s.table))
            md += [_table_md(s.table), ""]
        parts.extend(s.raw_html)
        for caption, png in s.images:
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    path = out_dir / f"{stem}.html"
    path.write_text("".join(parts))
    return path
