"""The evaluation report's content model: sections of tables and figures.

Every evaluation (subject-level readout, survival, COVID severity, detection, dense maps,
label efficiency, ablations) returns :class:`Section` objects; the writer renders them all
into one report (``report.html``, ``report.md``, PNG figures and ``results.json``).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drasclr.atomic import atomic_write_bytes


@dataclass(frozen=True)
class Score:
    """A metric over folds (or repeats): its values, summarised as mean and SD."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Score":
        return cls(tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel()))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


@dataclass
class Table:
    """One table: a header and rows of cells (text, numbers or :class:`Score`)."""

    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


@dataclass
class Figure:
    """A PNG written into the report folder (``path`` relative to it)."""

    title: str
    path: Path
    caption: str = ""


@dataclass
class Section:
    """A part of the report: a heading, a paragraph, its tables and figures."""

    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class PairedDifference:
    """The mean difference of two rows over the splits they share, and the p-value of a paired
    test of it (``drasclr.evaluation.paired``)."""

    difference: float
    p: float

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.difference):
            return "n/a"
        p = f"{self.p:.3f}" if self.p >= 0.001 else "<0.001"
        return f"{self.difference:+.{digits}f} (p {p})"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error, and the values it was averaged from (e.g. a
    C-index over repeated folds with a standard error from their spread)."""

    value: float
    se: float
    values: tuple[float, ...] = ()

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} ± {self.se:.{digits}f}"


def format_cell(cell, digits: int = 3) -> str:
    """The text of a table cell: scores as 'mean ± SD', floats to ``digits`` decimals."""
    if isinstance(cell, Score):
        return cell.format(digits) if np.isfinite(cell.mean) else "n/a"
    if isinstance(cell, (Estimate, PairedDifference)):
        return cell.format(digits)
    if cell is None:
        return ""
    if isinstance(cell, (float, np.floating)):
        return f"{cell:.{digits}f}" if np.isfinite(cell) else "n/a"
    return str(cell)


def format_text_table(table: Table, digits: int = 2) -> str:
    """A compact plain-text rendering of ``table`` for the terminal."""
    cells = [[str(c) for c in table.columns]]
    cells += [[format_cell(c, digits).replace(" ± ", "±") for c in row] for row in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([table.title, *lines])


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (``drasclr.atomic``); returns ``path``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def write_report(sections: list[Section], out: str | Path, settings: dict,
                 title: str = "DrasCLR evaluation report") -> Path:
    """Write ``out/report.html``, ``out/report.md`` and ``out/results.json``; returns the HTML.

    The HTML is one self-contained file (inline CSS, figures embedded as base64 PNG); the
    Markdown links the PNG files. ``results.json`` holds the settings and every section with
    every number (scores keep their fold values) and reads back with :func:`read_results`.
    Figure paths are relative to ``out`` (absolute paths are taken as they are, so sections of
    several evaluations can be concatenated into one report).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(sections, out / "results.json", settings, title)
    atomic_write_bytes(out / "report.md", _markdown(sections, out, settings, title).encode())
    atomic_write_bytes(out / "report.html", _html(sections, out, settings, title).encode())
    return out / "report.html"


def write_results(sections: list[Section], path: str | Path, settings: dict,
                  title: str = "DrasCLR evaluation report") -> Path:
    """Write the sections and settings as JSON atomically, every number kept (scores with
    their fold values); :func:`read_results` reads them back."""
    results = {"title": title, "settings": _json_safe(settings),
               "sections": [_section_to_json(s) for s in sections]}
    atomic_write_bytes(path, json.dumps(results, indent=1).encode())
    return Path(path)


def read_results(path: str | Path) -> tuple[list[Section], dict]:
    """The sections and settings of a ``results.json`` written by :func:`write_report`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        sections = [_section_from_json(s) for s in data["sections"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a drasclr results file ({error})") from error
    return sections, data["settings"]


# --- results.json -----------------------------------------------------------------------------

def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # strict JSON has no NaN


def _cell_to_json(cell):
    if isinstance(cell, Score):
        return {"type": "score", "mean": _number(cell.mean), "sd": _number(cell.sd),
                "values": [_number(v) for v in cell.values]}
    if isinstance(cell, Estimate):
        return {"type": "estimate", "value": _number(cell.value), "se": _number(cell.se),
                "values": [_number(v) for v in cell.values]}
    if isinstance(cell, PairedDifference):
        return {"type": "paired difference", "difference": _number(cell.difference),
                "p": _number(cell.p)}
    return _json_safe(cell)


def _cell_from_json(cell):
    if isinstance(cell, dict) and cell.get("type") == "score":
        return Score.of([np.nan if v is None else v for v in cell["values"]])
    if isinstance(cell, dict) and cell.get("type") == "estimate":
        nan = lambda v: np.nan if v is None else float(v)  # noqa: E731
        return Estimate(nan(cell["value"]), nan(cell["se"]),
                        tuple(nan(v) for v in cell["values"]))
    if isinstance(cell, dict) and cell.get("type") == "paired difference":
        return PairedDifference(*(np.nan if cell[k] is None else float(cell[k])
                                  for k in ("difference", "p")))
    return cell


def _json_safe(value):
    """Numpy scalars and arrays, paths and tuples as plain JSON values; NaN as null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _number(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _section_to_json(section: Section) -> dict:
    return {
        "title": section.title, "intro": section.intro,
        "tables": [{"title": t.title, "columns": list(t.columns), "note": t.note,
                    "rows": [[_cell_to_json(c) for c in row] for row in t.rows]}
                   for t in section.tables],
        "figures": [{"title": f.title, "path": str(f.path), "caption": f.caption}
                    for f in section.figures],
    }


def _section_from_json(data: dict) -> Section:
    return Section(
        data["title"], data["intro"],
        [Table(t["title"], t["columns"], [[_cell_from_json(c) for c in row] for row in t["rows"]],
               t["note"]) for t in data["tables"]],
        [Figure(f["title"], Path(f["path"]), f["caption"]) for f in data["figures"]],
    )


# --- Markdown ---------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(sections: list[Section], out: Path, settings: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        for table in section.tables:
            lines += [f"**{_md_escape(table.title)}**", "",
                      "| " + " | ".join(_md_escape(c) for c in table.columns) + " |",
                      "|" + "|".join(" --- " for _ in table.columns) + "|"]
            lines += ["| " + " | ".join(_md_escape(format_cell(c)) for c in row) + " |"
                      for row in table.rows]
            lines += [""] + ([f"*{table.note}*", ""] if table.note else [])
        for figure in section.figures:
            lines += [f"![{_md_escape(figure.title)}]({figure.path.as_posix()})", "",
                      f"*{figure.title}.* {figure.caption}".rstrip(), ""]
    lines += ["## Settings", "", "```json", json.dumps(_json_safe(settings), indent=1), "```", ""]
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       background: #fff; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e5e5ea; }
nav ol { margin: 4px 0 0; padding-left: 22px; columns: 2; }
p.intro { margin: 4px 0 12px; max-width: 900px; }
.table-wrap { overflow-x: auto; margin: 12px 0 4px; }
table { border-collapse: collapse; font-size: 14px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0 6px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e5e5ea; text-align: left; }
td { white-space: nowrap; }
th { background: #f5f5f7; border-bottom: 2px solid #c7c7cc; font-weight: 600;
     vertical-align: bottom; min-width: 4em; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th .w { white-space: nowrap; }
td .sd { display: block; font-size: 12px; color: #6e6e73; }
tbody tr:nth-child(even) td { background: #fafafa; }
p.note { font-size: 13px; color: #555; margin: 2px 0 16px; max-width: 1000px; }
figure { margin: 18px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e5ea; }
figcaption { font-size: 13px; color: #444; margin-top: 4px; max-width: 1000px; }
table.settings td { text-align: left; white-space: normal; font-size: 13px; }
table.settings td:first-child { font-weight: 600; white-space: nowrap; }
"""


def _is_number(cell) -> bool:
    return (isinstance(cell, (Score, Estimate, PairedDifference, int, float, np.number))
            and not isinstance(cell, bool))


def _html_cell(cell) -> str:
    text = format_cell(cell)
    if isinstance(cell, (Score, Estimate)) and " ± " in text:
        # The spread goes under the mean, so that a wide table of scores fits the page.
        mean, spread = (html.escape(part) for part in text.split(" ± "))
        values = html.escape(", ".join(f"{v:.3f}" for v in cell.values))
        return f'<td class="num" title="{values}">{mean} <span class="sd">± {spread}</span></td>'
    return f'<td class="{"num" if _is_number(cell) else "text"}">{html.escape(text)}</td>'


def _html_table(table: Table) -> str:
    numeric = [bool(table.rows) and all(_is_number(row[i]) for row in table.rows)
               for i in range(len(table.columns))]
    # Headers wrap between words only, never at the hyphen of "1-off".
    head = "".join(f'<th class="{"num" if n else "text"}">'
                   + " ".join(f'<span class="w">{html.escape(w)}</span>' for w in str(c).split())
                   + "</th>" for c, n in zip(table.columns, numeric))
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f'<div class="table-wrap"><table><caption>{html.escape(table.title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}")


def _html_figure(figure: Figure, out: Path) -> str:
    data = base64.b64encode((out / figure.path).read_bytes()).decode()
    caption = f"<b>{html.escape(figure.title)}.</b> {html.escape(figure.caption)}"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _setting_text(value) -> str:
    """A setting as compact text: JSON with floats to 4 significant digits."""
    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return float(f"{v:.4g}") if isinstance(v, float) else v

    value = _json_safe(value)
    return value if isinstance(value, str) else json.dumps(rounded(value))


def _html(sections: list[Section], out: Path, settings: dict, title: str) -> str:
    contents = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
                       for i, s in enumerate(sections, 1))
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
             f"<h1>{html.escape(title)}</h1><nav><ol>{contents}"
             f'<li><a href="#settings">Settings</a></li></ol></nav>']
    for i, section in enumerate(sections, 1):
        parts.append(f'<section id="s{i}"><h2>{html.escape(section.title)}</h2>')
        if section.intro:
            parts.append(f'<p class="intro">{html.escape(section.intro)}</p>')
        parts += [_html_table(t) for t in section.tables]
        parts += [_html_figure(f, out) for f in section.figures]
        parts.append("</section>")
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td>"
                   f"<td>{html.escape(_setting_text(v))}</td></tr>" for k, v in settings.items())
    parts.append(f'<section id="settings"><h2>Settings</h2><div class="table-wrap">'
                 f'<table class="settings"><tbody>{rows}</tbody></table></div></section>')
    parts.append("</main></body></html>\n")
    return "".join(parts)
