"""Decide thresholds chosen from the tiny models' own scores, not typed in.

The random-weight tiny presets score every text within a narrow band (about 0.385 on today's
versions). A threshold typed into a test (0.3849) means "about half kept" on one version of the
numerics and "all kept" or "all rejected" on the next, and the test silently stops testing what it
says. These are quantiles of the scores of one real run of the tiny recipe, computed once per
test session, so "the median" stays the median on any version.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"


@functools.cache
def tiny_itm_scores() -> dict[str, np.ndarray]:
    """ITM scores per source (web, synthetic) of the tiny recipe over a small synthetic corpus."""
    from capfilt.config import load_config
    from capfilt.pipeline import run
    from capfilt.synthetic import main_synth

    with tempfile.TemporaryDirectory() as tmp:
        main_synth(Path(tmp) / "data", shards=1, per_shard=24, broken=False, seed=11)
        config = load_config(RECIPE, ["decide.web.itm=0", "decide.synthetic.itm=0"]).model_copy(
            update={"input": [str(p) for p in (Path(tmp) / "data").glob("*.tar")], "output": str(Path(tmp) / "out")}
        )
        run(config, progress=False)
        rows = pq.read_table(sorted((Path(tmp) / "out" / "ledger").glob("*.parquet"))).to_pylist()
    scores = {
        s: np.array([r["itm"] for r in rows if r["source"] == s and r["itm"] is not None]) for s in ("web", "synthetic")
    }
    assert all(len(v) >= 10 for v in scores.values()), {s: len(v) for s, v in scores.items()}
    return scores


def split_thresholds(web: float = 0.5, synthetic: float = 0.5) -> list[str]:
    """`--set` overrides putting each source's ITM threshold at that quantile of its scores."""
    scores = tiny_itm_scores()
    return [
        f"decide.web.itm={float(np.quantile(scores['web'], web))!r}",
        f"decide.synthetic.itm={float(np.quantile(scores['synthetic'], synthetic))!r}",
    ]
