"""Reading a run for the report: run.json, summary, the ledger grouped into samples, failure details."""

from __future__ import annotations

from pathlib import Path

from capfilt.config import AUTO_RANK, SCORES, SOURCES, laion_mode
from capfilt.report.markup import finite


class Run:
    """A run directory read once: run.json, summary, ledger grouped into samples, failure details."""

    def __init__(self, run_dir: str | Path):
        from capfilt.io.names import SUMMARY_FILE
        from capfilt.io.run_dir import read_ledger, read_run_json, read_run_record, read_stats

        self.dir = run_dir  # a local path or the URL the run was written to (s3://…)
        self.meta = read_run_record(run_dir)
        self.config = self.meta.get("config", {})
        self.decide = self.config.get("decide") or {}
        self.summary = read_run_json(run_dir, SUMMARY_FILE)
        self.ledger = read_ledger(run_dir)
        self.samples: dict[tuple, list[dict]] = {}
        for r in self.ledger:
            self.samples.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
        for rows in self.samples.values():
            rows.sort(key=lambda r: r["candidate"])
        self.scores = [s for s in SCORES if any(finite(r[s]) for r in self.ledger)]
        self.digits = {
            s: _decimals([r[s] for r in self.ledger] + [self.limit(src, s) for src in SOURCES]) for s in SCORES
        }
        self.rank = self._rank_score()
        # One example (key: detail) per failure reason and shard, as the stats files keep them.
        self.details: dict[tuple, str] = {}
        self.failure_examples: dict[str, str] = {}
        for stats in read_stats(run_dir):
            for reason, example in (stats.get("failure_examples") or {}).items():
                key, _, detail = str(example).partition(": ")
                self.details[(stats.get("shard"), key, reason)] = detail
                self.failure_examples.setdefault(reason, str(example))

    def limit(self, source: str, score: str) -> float | None:
        value = (self.decide.get(source) or {}).get(score)
        return value if finite(value) else None

    def _rank_score(self) -> str | None:
        """The score texts are ranked by (decide.rank_by; auto: CLIP where computed, else ITM, else ITC)."""
        if laion_mode(self.decide):
            return "clip"
        if self.decide.get("rank_by") not in (None, "auto"):
            return self.decide["rank_by"]
        return next((s for s in AUTO_RANK if s in self.scores), None)

    def margin(self, row: dict) -> float | None:
        """Signed distance of a scored text to the nearest of its source's thresholds (> 0: above)."""
        if row["candidate"] < 0 or row["source"] is None:
            return None
        margins = [row[s] - t for s in SCORES if finite(row[s]) and (t := self.limit(row["source"], s)) is not None]
        return min(margins, key=abs) if margins else None


def _decimals(values: list) -> int:
    from capfilt.report.charts import decimals

    return decimals([v for v in values if finite(v)])
