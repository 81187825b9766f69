"""Page assembly: `build_report` writes one self-contained HTML file for a run or a loop
(templates/page.html). The stylesheet is package data (report.css), inlined into the page."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

from capfilt.report.examples import parse_show
from capfilt.report.loop_table import loop_capfilt_dir, rounds_table
from capfilt.report.sections import run_section
from capfilt.report.templates import Markup, render

# report.css sizes .card and .thumb for examples.THUMB (128 px): change both together.
CSS = files("capfilt.report").joinpath("report.css").read_text(encoding="utf-8")


def _report_date(date: bool) -> str | None:
    if not date:
        return None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


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
    from capfilt.io.folder import is_local, local_path
    from capfilt.io.names import RUN_FILE
    from capfilt.io.run_dir import is_run

    if not is_local(run_dir):  # a run written to a store (s3://…): read there, the page written here
        url = os.fspath(run_dir).rstrip("/")
        if not is_run(url):
            raise FileNotFoundError(f"{url} is not a capfilt run (no run.json)")
        title = url.rsplit("/", 1)[-1]
        out = Path(out) if out else Path(f"{title}-report.html")
        body = run_section(url, categories, n_samples, seed, url)
        return _write_page(out, date, title=title, what="CapFilt run (capfilt run)", where=url, body=[body])
    run_dir = local_path(run_dir)  # a path, or a file:// / local:// URL's
    is_loop = (run_dir / "state.json").is_file()
    if not is_loop and not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is neither a capfilt run (no run.json) nor a loop output (no state.json)")
    out = Path(out) if out else run_dir / "report.html"
    cli_dir = str(run_dir)
    title = run_dir.resolve().name
    what = "bootstrap loop (capfilt loop)" if is_loop else "CapFilt run (capfilt run)"
    if not is_loop:
        body = run_section(run_dir, categories, n_samples, seed, cli_dir)
        return _write_page(out, date, title=title, what=what, where=run_dir.resolve(), body=[body])
    state = json.loads((run_dir / "state.json").read_text())
    yaml = run_dir / "loop.yaml"
    rounds = state.get("rounds", [])
    capfilt_dir = loop_capfilt_dir(run_dir)
    loop_run, other_runs, body = None, [], []
    if capfilt_dir is not None:
        loop_run = capfilt_dir.relative_to(run_dir)
        other_runs = sorted(
            str(p.relative_to(run_dir))
            for p in run_dir.glob("round-*/capfilt*")
            if (p / RUN_FILE).is_file() and p != capfilt_dir
        )
        body.append(run_section(capfilt_dir, categories, n_samples, seed, str(Path(cli_dir) / loop_run)))
    return _write_page(
        out,
        date,
        title=title,
        what=what,
        where=run_dir.resolve(),
        body=body,
        loop_yaml=yaml.read_text() if yaml.is_file() else None,
        rounds=Markup(rounds_table(rounds, run_dir)) if rounds else None,
        loop_run=loop_run,
        other_runs=other_runs,
    )


def _write_page(
    out: Path,
    date: bool,
    *,
    title: str,
    what: str,
    where,
    body: list[str],
    loop_yaml: str | None = None,
    rounds: Markup | None = None,
    loop_run: Path | None = None,
    other_runs: list[str] = (),
) -> Path:
    """The page of a run (``body``: its section) or of a loop (its config, rounds table, the run
    shown and the others)."""
    page = render(
        "page.html",
        css=Markup(CSS),
        written=_report_date(date),
        title=title,
        what=what,
        where=where,
        body=[Markup(b) for b in body],
        loop_yaml=loop_yaml,
        rounds=rounds,
        loop_run=loop_run,
        other_runs=list(other_runs),
    )
    out.write_text(page + "\n", encoding="utf-8")
    return out
