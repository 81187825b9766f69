"""Alt-text and synthetic captions mixed on purpose (decide.select: mix): the web text is kept when
it passes, next to the best verified synthetic caption(s), and {key}.txt is the synthetic one for a
`synthetic_share` of the samples, drawn per key; summary.json reports the share it came out as."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from capfilt.config import ConfigError, DecideConfig, parse_config
from capfilt.records import SYNTHETIC, WEB
from capfilt.stages.decide import decide_sample, mix_draw


def _cands(web_itm=0.9, syn_itms=(0.8, 0.6)):
    web = {"source": WEB, "text": "the web text", "reason": "", "itm": web_itm, "itc": None, "clip": None}
    syn = [
        {"source": SYNTHETIC, "text": f"caption {k}", "reason": "", "itm": v, "itc": None, "clip": None}
        for k, v in enumerate(syn_itms)
    ]
    return [web, *syn]


def _mix(share, top_m=1):
    return DecideConfig(web={"itm": 0.5}, synthetic={"itm": 0.5}, top_m=top_m, select="mix", synthetic_share=share)


def test_mix_keeps_the_web_text_and_the_best_caption_and_picks_by_the_share():
    seeds = range(4000)
    picks = [decide_sample(_cands(), _mix(0.8), seed=s) for s in seeds]
    assert all(d["kept"] == [True, True, False] for d in picks)  # web + the best synthetic (top_m 1)
    synthetic = sum(d["selected"] == 1 for d in picks)
    assert sum(d["selected"] == 0 for d in picks) + synthetic == len(picks)
    assert abs(synthetic / len(picks) - 0.8) < 0.03  # 4000 draws: 4.7 standard deviations
    # the draw is the sample's seed alone: the same seed picks the same text again
    assert [decide_sample(_cands(), _mix(0.8), seed=s)["selected"] for s in range(50)] == [
        d["selected"] for d in picks[:50]
    ]
    assert [mix_draw(s) < 0.8 for s in range(50)] == [d["selected"] == 1 for d in picks[:50]]


def test_mix_falls_back_to_whichever_text_passed():
    assert decide_sample(_cands(web_itm=0.1), _mix(0.0), seed=1)["selected"] == 1  # web rejected
    assert decide_sample(_cands(syn_itms=(0.1, 0.2)), _mix(1.0), seed=1)["selected"] == 0  # no caption passed
    assert all(decide_sample(_cands(), _mix(0.0), seed=s)["selected"] == 0 for s in range(20))
    assert all(decide_sample(_cands(), _mix(1.0), seed=s)["selected"] == 1 for s in range(20))
    two = decide_sample(_cands(), _mix(1.0, top_m=2), seed=3)
    assert two["kept"] == [True, True, True] and two["selected"] == 1  # the best of the two


def test_mix_and_its_share_go_together():
    with pytest.raises(ConfigError, match="select: mix and synthetic_share go together"):
        parse_config({"filter": {"model": "tiny-blip"}, "decide": {"select": "mix"}})
    with pytest.raises(ConfigError, match="select: mix and synthetic_share go together"):
        parse_config({"filter": {"model": "tiny-blip"}, "decide": {"synthetic_share": 0.5}})
    with pytest.raises(ConfigError, match="synthetic_share"):
        parse_config({"filter": {"model": "tiny-blip"}, "decide": {"select": "mix", "synthetic_share": 1.5}})
    assert "synthetic_share" not in parse_config({"filter": {"model": "tiny-blip"}}).model_dump()["decide"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny):
    from capfilt.pipeline import run
    from capfilt.synthetic import main_synth

    root = tmp_path_factory.mktemp("mix")
    main_synth(root / "data", shards=2, per_shard=8, broken=False, seed=5)
    cfg = tiny(
        sorted((root / "data").glob("*.tar")),
        root / "run",
        extra=["decide.select=mix", "decide.synthetic_share=0.5", "decide.top_m=1"],
        thresholds=["decide.web.itm=0", "decide.synthetic.itm=0"],
    )
    assert run(cfg, fresh=True).ok
    return root / "run"


def test_summary_reports_the_mixing_ratio(mixed_run):
    summary = json.loads((mixed_run / "summary.json").read_text())
    rows = pq.read_table(mixed_run / "ledger").to_pylist()
    chosen = [r for r in rows if r["selected"]]
    n_syn = sum(r["source"] == SYNTHETIC for r in chosen)
    assert summary["kept"] == 16 == len(chosen)
    assert summary["mixing"] == {
        "select": "mix",
        "target_synthetic_share": 0.5,
        "synthetic_share": n_syn / 16,
        "selected_web": 16 - n_syn,
        "selected_synthetic": n_syn,
    }
    assert 0 < n_syn < 16  # both kinds of text chosen at 0.5 over 16 samples (seeded: not by chance)
    for r in chosen:  # every kept sample keeps its web text and one caption, whichever is chosen
        sample = [x for x in rows if x["key"] == r["key"]]
        assert [x["source"] for x in sample if x["kept"]] == [WEB, SYNTHETIC]


def test_rethreshold_replays_another_share_without_a_model(mixed_run, tmp_path, monkeypatch):
    from capfilt.modeling import captioner, clip_reranker, itm_filter, loading
    from capfilt.rethreshold import rethreshold

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for target in (clip_reranker.ClipReranker, captioner.Captioner, itm_filter.ItmFilter):
        monkeypatch.setattr(target, "__init__", refuse)
    monkeypatch.setattr(loading, "from_pretrained", refuse)
    summary = rethreshold(str(mixed_run), str(tmp_path / "all-web"), overrides=["decide.synthetic_share=0"])
    assert summary["mixing"]["synthetic_share"] == 0.0 and summary["mixing"]["selected_web"] == 16
    summary = rethreshold(str(mixed_run), str(tmp_path / "all-syn"), overrides=["decide.synthetic_share=1"])
    assert summary["mixing"]["synthetic_share"] == 1.0 and summary["mixing"]["target_synthetic_share"] == 1.0
