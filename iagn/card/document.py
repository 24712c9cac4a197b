"""A small document model rendered twice: Markdown (terminals, `iagn models card`) and one
self-contained HTML file (the MLflow UI shows artifacts in a sandboxed frame, so the images
are inlined as data URIs). Building the card once as blocks keeps the two renderings equal.

Text is plain, except `code` spans between backticks; the HTML escapes everything.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_CODE = re.compile(r"`([^`]+)`")


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: Sequence[str]


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass
class Image:
    path: Path  # a PNG beside the card; Markdown links it, HTML inlines it
    alt: str


@dataclass
class Details:
    """A folded part in HTML (long lists); shown in full in Markdown."""

    summary: str
    blocks: list = field(default_factory=list)


Block = Heading | Para | Bullets | Table | Image | Details


def cell(value: object) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_cell(value: object) -> str:
    return cell(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Image):
            lines += [f"![{block.alt}]({block.path.name})", ""]
        elif isinstance(block, Details):
            lines += [f"**{block.summary}**", ""]
            lines.append(to_markdown(block.blocks).rstrip("\n"))
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


def _html_blocks(blocks: Sequence[Block]) -> list[str]:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_inline(item)}</li>" for item in block.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(cell(h))}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(cell(v))}</td>" for v in row) + "</tr>"
                for row in block.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            alt = html.escape(block.alt)
            out.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>')
        elif isinstance(block, Details):
            inner = "\n".join(_html_blocks(block.blocks))
            out.append(f"<details><summary>{_inline(block.summary)}</summary>{inner}</details>")
    return out


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f5f5f5; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #eee; }
details { margin: .6em 0; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    body = "\n".join(_html_blocks(blocks))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
