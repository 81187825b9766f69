"""Page assembly: `build_report` writes one self-contained HTML file for a run or a loop.
The stylesheet is package data (report.css), inlined into the page."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

from capfilt.config import is_url
from capfilt.report.examples import parse_show
from capfilt.report.loop_table import loop_capfilt_dir, rounds_table
from capfilt.report.markup import esc
from capfilt.report.sections import run_section

# report.css sizes .card and .thumb for examples.THUMB (128 px): change both together.
CSS = files("capfilt.report").joinpath("report.css").read_text(encoding="utf-8")


def _report_date(date: bool) -> str:
    if not date:
        return ""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return f'<p class="note">report written {when.isoformat(timespec="seconds")}</p>'


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    n_samples: int = 12,
    seed: int = 0,
    show: list[str] | tuple[str, ...] | None = None,
    date: bool = True,
) -> Path:
    """Write the HTML report of a run (or of a loop: state.json + round-*/) and return its path.
    ``show``: example categories (see CATEGORIES; comma lists allowed), ``n_samples`` cards each."""
    categories = parse_show(show) if show else None  # None: the run's mode chooses (run_section)
    if n_samples < 0:
        raise ValueError(f"--examples must be >= 0, not {n_samples}")
    from capfilt.io.run_dir import is_run

    if is_url(run_dir):  # a run written to a URL (s3://…): read there, the page written here
        url = os.fspath(run_dir).rstrip("/")
        if not is_run(url):
            raise FileNotFoundError(f"{url} is not a capfilt run (no run.json)")
        title = url.rsplit("/", 1)[-1]
        out = Path(out) if out else Path(f"{title}-report.html")
        where, body = url, run_section(url, categories, n_samples, seed, url)
        return _write_page(out, title, "CapFilt run (capfilt run)", where, date, [body])
    run_dir = Path(run_dir)
    is_loop = (run_dir / "state.json").is_file()
    if not is_loop and not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is neither a capfilt run (no run.json) nor a loop output (no state.json)")
    out = Path(out) if out else run_dir / "report.html"
    cli_dir = str(run_dir)
    title = run_dir.resolve().name
    what = "bootstrap loop (capfilt loop)" if is_loop else "CapFilt run (capfilt run)"
    parts = []
    if is_loop:
        state = json.loads((run_dir / "state.json").read_text())
        rounds = state.get("rounds", [])
        if (run_dir / "loop.yaml").is_file():
            parts.append(
                f"<details><summary>loop config (loop.yaml)</summary><pre>"
                f"{esc((run_dir / 'loop.yaml').read_text())}</pre></details>"
            )
        if rounds:
            parts.append("<h2>Rounds</h2>" + rounds_table(rounds, run_dir))
        capfilt_dir = loop_capfilt_dir(run_dir)
        if capfilt_dir is not None:
            rel = capfilt_dir.relative_to(run_dir)
            parts.append(f"<h2>CapFilt run {esc(rel)}</h2>")
            others = sorted(
                str(p.relative_to(run_dir))
                for p in run_dir.glob("round-*/capfilt*")
                if (p / "run.json").is_file() and p != capfilt_dir
            )
            if others:
                parts.append(
                    '<p class="note">Other CapFilt runs of this loop (<code>capfilt report DIR</code> on '
                    "each): " + ", ".join(f"<code>{esc(o)}</code>" for o in others) + "</p>"
                )
            parts.append(run_section(capfilt_dir, categories, n_samples, seed, str(Path(cli_dir) / rel)))
    else:
        parts.append(run_section(run_dir, categories, n_samples, seed, cli_dir))
    return _write_page(out, title, what, run_dir.resolve(), date, parts)


def _write_page(out: Path, title: str, what: str, where, date: bool, body: list[str]) -> Path:
    head = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>capfilt report: {esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body><main>'
        f"<h1>capfilt report: {esc(title)}</h1>"
        f'<p class="note">{what}: <code>{esc(where)}</code></p>{_report_date(date)}'
    )
    out.write_text(head + "".join(body) + "</main></body></html>\n", encoding="utf-8")
    return out
