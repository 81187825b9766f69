"""The clip rerank chain (issue 17): LAION-COCO's ViT-L/14 keeps 5 of 40 captions, RN50x64 picks one.

* config: one mapping is a chain of one (and dumps as before: same fingerprint); a list is a chain;
* the cut (`link_cut`): min_score, then keep_top, ties to the earlier caption; only synthetic
  captions are cut, the web text always goes on;
* the Clip stage: each model encodes each image once and scores only what the model before it
  passed on; every model's score of every text it saw is in the ledger (`clip_scores`, `clip`);
* end to end with the tiny twin of pipelines/laion_coco.yaml; `rethreshold` re-cuts the chain
  with another keep_top from the ledger without loading any model, and refuses cutoffs that need
  scores the run never computed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import capfilt.synthetic as syn
from capfilt.config import ConfigError, load_config, output_settings, parse_config
from capfilt.records import Reason
from capfilt.stages.clip import ChainReplayError, chain_cut, link_cut

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "demo" / "laion_coco_tiny.yaml"
NO_THRESHOLDS = {"decide": {"web": {}, "synthetic": {}}}
CUTS = {Reason.NOT_IN_CLIP_TOP_K, Reason.CLIP_BELOW_MIN}


# --------------------------------------------------------------------------- config


def test_one_mapping_is_a_chain_of_one_and_dumps_as_before():
    config = load_config(ROOT / "pipelines" / "demo" / "tiny.yaml")
    assert [(m.model, m.keep_top, m.min_score) for m in config.clip.chain] == [("tiny-clip", None, None)]
    assert config.clip.model == "tiny-clip" and config.clip.pretrained is None
    # run.json and the fingerprint see the mapping a recipe had before chains: runs still resume.
    assert config.model_dump(mode="json")["clip"] == {"model": "tiny-clip", "pretrained": None, "batch_size": None}
    old = output_settings(config.model_dump())
    assert config.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert parse_config(config.model_dump()).clip == config.clip


def test_a_list_is_a_chain_and_its_cutoffs_are_validated():
    chain = [
        {"model": "ViT-L-14", "pretrained": "openai", "keep_top": 5},
        {"model": "RN50x64", "pretrained": "openai", "keep_top": 1},
    ]
    config = parse_config({**NO_THRESHOLDS, "clip": chain})
    assert [(m.model, m.keep_top) for m in config.clip.chain] == [("ViT-L-14", 5), ("RN50x64", 1)]
    assert config.clip.model == "RN50x64"  # the last model's cosine is `clip`
    assert parse_config({**NO_THRESHOLDS, "clip": {"chain": chain, "batch_size": 8}}).clip.chain == config.clip.chain
    assert parse_config(config.model_dump(mode="json")).clip == config.clip  # run.json round trip
    recipe = load_config(ROOT / "pipelines" / "laion_coco.yaml").clip.chain
    assert [(m.model, m.pretrained, m.keep_top) for m in recipe] == [
        ("ViT-L-14", "openai", 5),
        ("RN50x64", "openai", 1),
    ]
    for bad, where in (
        ([], "clip.chain"),
        ([{"model": "x", "keep_top": 0}], "clip.chain.0.keep_top"),
        ([{"model": "x", "min_score": 2}], "clip.chain.0.min_score"),
        ({"model": "x", "top_k": 5}, "clip.chain.0.top_k: unknown key"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse_config({**NO_THRESHOLDS, "clip": bad})


# --------------------------------------------------------------------------- the cut, as a pure function


def test_link_cut_min_score_then_keep_top_ties_to_the_earlier():
    scores = {1: 0.3, 2: 0.1, 3: 0.3, 4: 0.5, 5: -0.2}
    assert link_cut(scores, None, None) == {}
    assert link_cut(scores, 2, None) == {
        2: Reason.NOT_IN_CLIP_TOP_K,
        3: Reason.NOT_IN_CLIP_TOP_K,
        5: Reason.NOT_IN_CLIP_TOP_K,
    }  # 1 ties with 3 and is earlier
    assert link_cut(scores, None, 0.2) == {2: Reason.CLIP_BELOW_MIN, 5: Reason.CLIP_BELOW_MIN}
    assert link_cut(scores, 1, 0.2) == {
        2: Reason.CLIP_BELOW_MIN,
        5: Reason.CLIP_BELOW_MIN,
        1: Reason.NOT_IN_CLIP_TOP_K,
        3: Reason.NOT_IN_CLIP_TOP_K,
    }


def _cands(chain_scores):
    """A web text (candidate 0) and synthetic captions with recorded per-model scores."""
    return [
        {"source": "web" if j == 0 else "synthetic", "text": f"t{j}", "reason": "", "clip_scores": s}
        for j, s in enumerate(chain_scores)
    ]


def test_chain_cut_replays_and_refuses_what_it_cannot_replay():
    class Link:
        def __init__(self, keep_top=None, min_score=None):
            self.model, self.keep_top, self.min_score = "m", keep_top, min_score

    # The run: model 0 kept the best 2 captions (1 and 3), model 1 the best one of those (3).
    cands = _cands([[0.0, 0.9], [0.4, 0.2], [0.1, None], [0.3, 0.5], [-0.1, None]])
    cut = Reason.NOT_IN_CLIP_TOP_K
    assert chain_cut(cands, [Link(2), Link(1)]) == ["", cut, cut, "", cut]
    # Tighter before the last model, or anything at the last one: replayable.
    assert chain_cut(cands, [Link(1), Link(1)]) == ["", "", cut, cut, cut]
    assert chain_cut(cands, [Link(2), Link(2, min_score=0.3)])[1] == Reason.CLIP_BELOW_MIN
    # Looser before the last model: model 1 never scored caption 2.
    with pytest.raises(ChainReplayError, match="model 1 .* never scored candidate 2"):
        chain_cut(cands, [Link(3), Link(1)])


# --------------------------------------------------------------------------- the Clip stage


def test_each_model_sees_each_image_once_and_only_what_was_passed_on(images):
    from capfilt.config import parse_config
    from capfilt.records import row_candidates
    from capfilt.stages.clip import Clip

    config = parse_config(
        {**NO_THRESHOLDS, "clip": [{"model": "tiny-clip", "keep_top": 2}, {"model": "tiny-clip-rn", "keep_top": 1}]}
    )
    stage = Clip(config.clip, device="cpu")
    seen = [[] for _ in stage.models]
    for k, model in enumerate(stage.models):
        encode_images, encode_texts = model.encode_images, model.encode_texts
        model.encode_images = lambda ims, k=k, f=encode_images: (seen[k].append(("images", len(ims))), f(ims))[1]
        model.encode_texts = lambda ts, k=k, f=encode_texts: (seen[k].append(("texts", list(ts))), f(ts))[1]
    captions = [
        ["a red square", "two blue circles", "a red square", "three green stars"],
        ["one small yellow star", "", "big purple triangles"],
        ["a circle"],
    ]
    batch = {
        "key": ["a", "b", "c"],
        "image": images[:3],
        "web_text": ["web a", None, "web c"],
        "web_reason": ["", Reason.WEB_TEXT_MISSING, ""],
        "captions": captions,
        "failure": ["", "", ""],
        "detail": ["", "", ""],
    }
    out = stage(batch)
    for calls in seen:  # one image batch per model, all 3 images
        assert [n for kind, n in calls if kind == "images"] == [3]
    texts = [sorted(t for kind, ts in s if kind == "texts" for t in ts) for s in seen]
    # model 0: every live text (the duplicate, the empty caption and the missing web text are not scored)
    assert texts[0] == sorted(
        [
            "web a",
            "a red square",
            "two blue circles",
            "three green stars",
            "one small yellow star",
            "big purple triangles",
            "web c",
            "a circle",
        ]
    )
    assert len(texts[1]) == 3 + 2 + 2  # a: its web text and 2 best captions; b: its 2 captions; c: both texts
    for i in range(3):
        cands = row_candidates(out, i)
        for c in cands:
            if c["reason"]:  # rejected before scoring: no score, no cut
                assert c["clip_scores"] is None and c["clip"] is None and c["clip_cut"] == ""
                continue
            first, second = c["clip_scores"]
            assert first is not None and c["clip"] == second
            if c["source"] == "web":
                assert second is not None and c["clip_cut"] == ""
        syn = [c for c in cands if c["source"] == "synthetic" and not c["reason"]]
        best2 = sorted(syn, key=lambda c: -c["clip_scores"][0])[:2]
        assert all(c["clip_scores"][1] is not None for c in best2)
        assert all(
            c["clip_scores"][1] is None and c["clip_cut"] == Reason.NOT_IN_CLIP_TOP_K for c in syn if c not in best2
        )
        winner = max(best2, key=lambda c: c["clip"]) if best2 else None
        assert [c for c in syn if not c["clip_cut"]] == ([winner] if winner else [])


def test_a_nonfinite_score_stops_the_chain_and_fails_the_sample():
    from capfilt.config import DecideConfig
    from capfilt.stages.decide import decide_sample

    cands = _cands([[0.1, 0.2], [math.nan, None], [0.3, 0.1]])
    for c in cands:
        c["clip"], c["clip_cut"] = c["clip_scores"][-1], ""
    assert decide_sample(cands, DecideConfig(web={}, synthetic={}))["failure"] == Reason.NONFINITE_SCORE


# --------------------------------------------------------------------------- end to end, and rethreshold


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    from capfilt.pipeline import run

    data = tmp_path_factory.mktemp("chain-data")
    examples = syn.make_split("web", 12, seed=5, noise_share=0.3, image_size=48)
    syn.write_shards(data, examples, per_shard=6)
    out = tmp_path_factory.mktemp("chain-run") / "out"
    config = load_config(RECIPE).model_copy(
        update={"input": [str(p) for p in sorted(data.glob("*.tar"))], "output": str(out)}
    )
    result = run(config, progress=False)
    assert result.ok
    return out


def ledger(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()


def by_sample(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["shard"], r["key"]), []).append(r)
    return out


def test_the_ledger_shows_both_models_scores_and_the_cut(chain_run):
    samples = by_sample(ledger(chain_run))
    assert samples
    for rows in samples.values():
        web = rows[0]
        syn_rows = [r for r in rows[1:] if r["reason"] not in (Reason.DUPLICATE_TEXT, Reason.CAPTION_EMPTY)]
        assert len(web["clip_scores"]) == 2 and web["clip"] == web["clip_scores"][1] and web["kept"]
        first = sorted(syn_rows, key=lambda r: (-r["clip_scores"][0], r["candidate"]))
        top3, rest = first[:3], first[3:]  # model 0 (tiny-clip) keeps 3
        assert all(r["clip_scores"][1] is not None and r["clip"] == r["clip_scores"][1] for r in top3)
        assert all(
            r["clip_scores"][1] is None and r["clip"] is None and r["reason"] == Reason.NOT_IN_CLIP_TOP_K for r in rest
        )
        winner = max(top3, key=lambda r: (r["clip"], -r["candidate"]))  # model 1 (tiny-clip-rn) keeps 1
        assert winner["kept"] and winner["selected"] and winner["reason"] == ""
        assert all(r["reason"] == Reason.NOT_IN_CLIP_TOP_K and not r["kept"] for r in top3 if r is not winner)
    stats = json.loads((chain_run / "stats" / "00000.json").read_text())
    assert stats["candidate_rejections_by_reason"]["synthetic"][Reason.NOT_IN_CLIP_TOP_K] > 0
    laion = pq.read_table(chain_run / "laion" / "00000.parquet").to_pylist()
    for row in laion:  # all_similarities: model 0's scores of every caption; top_caption: model 1's pick
        rows = samples[("00000", row["key"])]
        scored = [r for r in rows[1:] if r["clip_scores"] is not None]
        assert row["all_captions"] == [r["text"] for r in scored]
        assert row["all_similarities"] == pytest.approx([r["clip_scores"][0] for r in scored])
        assert row["top_caption"] == next(r["text"] for r in rows if r["selected"])
        assert row["similarity"] == pytest.approx(next(r["clip"] for r in rows if r["selected"]))


@pytest.fixture
def no_models(monkeypatch):
    """Any model load raises: what runs under it runs without a model."""
    import open_clip

    from capfilt.modeling import captioner, clip_reranker, itm_filter, loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(clip_reranker.ClipReranker, "__init__", refuse)
    monkeypatch.setattr(captioner.Captioner, "__init__", refuse)
    monkeypatch.setattr(itm_filter.ItmFilter, "__init__", refuse)
    monkeypatch.setattr(loading, "from_pretrained", refuse)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)


def test_rethreshold_with_another_keep_top_rewrites_the_outputs_without_a_model(chain_run, tmp_path, no_models):
    from capfilt.rethreshold import rethreshold

    out = tmp_path / "keep2"
    summary = rethreshold(
        str(chain_run), str(out), overrides=["clip.0.keep_top=2", "clip.1.keep_top=2", "decide.top_m=2"]
    )
    assert summary["shards_done"] == summary["shards"] == 2
    clip = json.loads((out / "run.json").read_text())["config"]["clip"]
    assert [(m["model"], m["keep_top"]) for m in clip["chain"]] == [("tiny-clip", 2), ("tiny-clip-rn", 2)]
    old, new = by_sample(ledger(chain_run)), by_sample(ledger(out))
    assert old.keys() == new.keys()
    checked = 0
    for key, rows in new.items():
        before = old[key]
        assert [(r["text"], r["clip"], r["clip_scores"]) for r in rows] == [
            (r["text"], r["clip"], r["clip_scores"]) for r in before
        ]  # the recorded scores, unchanged
        scored = [r for r in rows[1:] if r["clip"] is not None]  # the run's model 0 top 3
        if len(scored) < 3:
            continue
        third = min(scored, key=lambda r: (r["clip_scores"][0], -r["candidate"]))  # model 0's 3rd: now cut
        assert third["reason"] == Reason.NOT_IN_CLIP_TOP_K and not third["kept"]
        kept = [r for r in rows[1:] if r["kept"]]
        assert len(kept) == 2 and third not in kept  # model 0 keeps 2, model 1 keeps both, top_m 2
        checked += 1
    assert checked >= len(new) // 2
    laion = pq.read_table(out / "laion" / "00000.parquet").to_pylist()
    assert laion == pq.read_table(chain_run / "laion" / "00000.parquet").to_pylist()  # same scores, same pick
    assert sum(1 for _ in (out / "shards").glob("*.tar")) == 2


def test_rethreshold_refuses_cutoffs_the_ledger_cannot_replay(chain_run, tmp_path, no_models):
    from capfilt.rethreshold import rethreshold

    out = tmp_path / "keep5"
    with pytest.raises(ConfigError, match=r"model 1 \(tiny-clip-rn\) never scored .* tighten"):
        rethreshold(str(chain_run), str(out), overrides=["clip.0.keep_top=5"])
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="clip chain has 2 models; name one as clip.K.keep_top"):
        rethreshold(str(chain_run), str(out), overrides=["clip.keep_top=2"])
    with pytest.raises(ConfigError, match="cannot --set clip.1.model"):
        rethreshold(str(chain_run), str(out), overrides=["clip.1.model=tiny-clip"])


def test_the_report_shows_every_chain_models_score(chain_run, tmp_path):
    from capfilt.report import build_report

    html = build_report(chain_run, tmp_path / "r.html", show=["random"], date=False).read_text()
    assert "CLIP chain " in html and " → " in html
