"""`capfilt report RUN_OR_LOOP_DIR`: one self-contained HTML page about a run (or a bootstrap loop).

The page, top to bottom:
- a header: the run's date and host, package versions, the models with their identities as
  run.json records them (preset / hub id + revision / path, sha256 of the weights), the decide
  thresholds, and the whole resolved config (collapsed);
- for a loop directory, the rounds table (round first, recall@1 / captioning metrics with their
  change over round 0, what CapFilt kept, the calibrated thresholds, the noise of the data);
- counts, rejections by reason, and score histograms (matplotlib, one panel per source, kept and
  rejected stacked, the threshold as a dashed line);
- example samples by category (``--show``): like the BLIP paper's figure, each card has the
  image in a fixed column and, beside it, every text with its source, scores and why it was kept
  or rejected (kept green, rejected red); failed samples get one line each.

Images are embedded as base64 JPEG thumbnails and charts as inline SVG: no external URL, no
script, so the file can be mailed around. The same run gives the same bytes, apart from the
"report written" date (``date=False`` / ``--no-date`` leaves it out; SOURCE_DATE_EPOCH fixes it).

The package, by job: ``run`` reads a run, ``examples`` chooses the example samples, ``cards`` and
``sections`` write a run's part of the page, ``loop_table`` the loop's rounds, ``charts`` the
histograms, ``markup`` the HTML helpers, and ``page`` assembles the file (``report.css``: its style).
"""

from capfilt.report.examples import CATEGORIES, DEFAULT_SHOW, LAION_DEFAULT_SHOW, parse_show, select
from capfilt.report.loop_table import rounds_table
from capfilt.report.page import build_report
from capfilt.report.run import Run

__all__ = [
    "CATEGORIES",
    "DEFAULT_SHOW",
    "LAION_DEFAULT_SHOW",
    "Run",
    "build_report",
    "parse_show",
    "rounds_table",
    "select",
]
