"""Score histograms for `capfilt report`, drawn with matplotlib and returned as inline SVG.

One figure per score (ITM, ITC, CLIP), with one panel per source side by side (web texts,
synthetic captions: synthetic captions outnumber web texts K to 1, so each panel has its own
y axis), each panel titled by its score and source; the report shows one figure per row. Each
panel stacks the kept texts (green) on the rejected ones (red), the colours of the report's
cards, and draws that source's threshold as a dashed line labelled with its value.

matplotlib is used without pyplot: a `Figure` on an explicit Agg canvas, so no GUI backend is
ever loaded and the process-wide backend choice of a caller (a notebook) is left alone. The SVG is
byte-for-byte deterministic: no date in its metadata, a fixed salt for its element ids, text as
<text> elements (small, searchable) rather than glyph paths.
"""

from __future__ import annotations

import io
import math
import re

from capfilt.config import SOURCES

KEPT_COLOUR, REJECTED_COLOUR, THRESHOLD_COLOUR = "#2e9d44", "#d33c3c", "#222222"
SOURCE_TITLES = {"web": "web texts", "synthetic": "synthetic captions"}
_RC = {
    "svg.hashsalt": "capfilt-report",  # deterministic element ids
    "svg.fonttype": "none",  # text stays text: the page's font renders it, tests can read it
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def decimals(values: list[float], least: int = 3, most: int = 6) -> int:
    """Decimals that tell these values apart: random-weight tiny models score every text within
    0.006 of 0.38, where three decimals would print the same number for a kept and a rejected text."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    spread = max(finite) - min(finite) if len(finite) > 1 else 0.0
    if spread <= 0:
        return least
    return max(least, min(most, math.ceil(-math.log10(spread)) + 2))


def score_histogram_svg(
    score: str, by_source: dict[str, dict[str, list[float]]], thresholds: dict[str, float | None], bins: int = 30
) -> str:
    """``by_source``: {source: {"kept": [...], "rejected": [...]}} of one score; ``thresholds``:
    {source: threshold or None}. Returns an <svg> element ('' when there is no value at all)."""
    import numpy as np
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    sources = [s for s in SOURCES if any(by_source.get(s, {}).values())]
    every = [v for s in sources for vs in by_source[s].values() for v in vs]
    if not every:
        return ""
    marks = {s: t for s, t in thresholds.items() if s in sources and t is not None and math.isfinite(t)}
    lo, hi = min(every + list(marks.values())), max(every + list(marks.values()))
    pad = (hi - lo) * 0.02 or 0.5 * 10 ** -decimals(every)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    digits = decimals(every + list(marks.values()))
    with rc_context(_RC):
        width = 3.3 * len(sources) + 0.4
        fig = Figure(figsize=(width, 2.5), dpi=96)
        FigureCanvasAgg(fig)
        # Fixed margins (inches): a constrained layout costs a second full draw per figure.
        fig.subplots_adjust(left=0.62 / width, right=1 - 0.12 / width, bottom=0.19, top=0.9, wspace=0.62 / 3.3 * 1.3)
        axes = fig.subplots(1, len(sources), sharex=True, squeeze=False)[0]
        for ax, source in zip(axes, sources):
            kept, rejected = by_source[source].get("kept", []), by_source[source].get("rejected", [])
            ax.hist(
                [kept, rejected],
                bins=edges,
                stacked=True,
                color=[KEPT_COLOUR, REJECTED_COLOUR],
                label=[f"kept ({len(kept)})", f"rejected ({len(rejected)})"],
                edgecolor="white",
                linewidth=0.4,
            )
            if source in marks:
                ax.axvline(
                    marks[source],
                    color=THRESHOLD_COLOUR,
                    linestyle="--",
                    linewidth=1.4,
                    label=f"threshold {marks[source]:.{digits}f}",
                )
            title = f"{score.upper()}: {SOURCE_TITLES.get(source, source)} ({len(kept) + len(rejected)} scored)"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(f"{score.upper()} score")
            ax.set_ylabel("texts")
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
            formatter = ScalarFormatter(useOffset=False)
            ax.xaxis.set_major_formatter(formatter)
            # Opaque, so a threshold line passing behind it does not strike through the labels.
            ax.legend(loc="upper right", fontsize=8, frameon=True, framealpha=0.92, edgecolor="none")
            ax.margins(y=0.45)  # room for the legend above the tallest bar
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype: the <svg> goes inline
    # and the RDF metadata block (its namespace URLs are the only http:// strings in the figure
    # besides the SVG namespace itself)
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)


def image_score_histogram_svg(score: str, kept: list[float], rejected: list[float], limit: float | None) -> str:
    """One panel of a per-image score (aesthetic, punsafe, pwatermark: one value per sample):
    kept samples stacked on rejected ones, decide's image rule as the dashed line ('' if empty)."""
    import numpy as np
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    every = kept + rejected + ([limit] if limit is not None else [])
    if not kept + rejected:
        return ""
    pad = (max(every) - min(every)) * 0.02 or 0.01
    edges = np.linspace(min(every) - pad, max(every) + pad, 31)
    with rc_context(_RC):
        fig = Figure(figsize=(3.7, 2.5), dpi=96)
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.17, right=0.97, bottom=0.19, top=0.9)
        ax = fig.subplots()
        labels = [f"kept ({len(kept)})", f"rejected ({len(rejected)})"]
        colours = [KEPT_COLOUR, REJECTED_COLOUR]
        ax.hist([kept, rejected], bins=edges, stacked=True, color=colours, label=labels, edgecolor="white", lw=0.4)
        if limit is not None:
            ax.axvline(limit, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.4, label=f"limit {limit:g}")
        ax.set_title(f"{score} ({len(kept) + len(rejected)} images)", fontsize=10)
        ax.set_xlabel(score)
        ax.set_ylabel("images")
        ax.legend(loc="upper right", fontsize=8, frameon=True, framealpha=0.92, edgecolor="none")
        ax.margins(y=0.45)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg") :], count=1, flags=re.S)
