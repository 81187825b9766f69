"""LAION's aesthetic, NSFW and watermark scores (issue 26 item 2): the published architectures
loaded strictly, computed from the clip chain's own embeddings (no second vision pass), decide's
image rules with their reasons, replayed by rethreshold with no model loaded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from capfilt import api
from capfilt.config import ConfigError, load_config, parse_config
from capfilt.modeling.heads import AestheticMLP, Head, NsfwMLP, WatermarkDetector
from capfilt.records import FAILED, KEPT, REJECTED, Reason
from capfilt.synthetic import make_split, write_shards

RECIPE = "pipelines/demo/laion_style_tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quality")
    examples = make_split("web", 12, seed=7, noise_share=0.3, image_size=64)
    urls = write_shards(base / "in", examples, per_shard=6)
    summary = api.run(RECIPE, input=urls, output=base / "out", progress=False)
    assert summary["ok"]
    return base / "out", urls


def _samples(out, shard="00000") -> dict:
    return {r["key"]: r for r in pq.read_table(out / "ledger" / f"{shard}.parquet").to_pylist()}


def test_the_heads_have_the_published_state_dict_layouts():
    aesthetic = {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()}
    assert aesthetic == {  # improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    nsfw = set(NsfwMLP(768).state_dict())
    assert nsfw == {"category_mapper", "mean", "std"} | {
        f"linear_{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    }


def test_watermark_detector_loads_laions_checkpoint_layout_and_matches_the_stock_timm_model():
    """LAION built its detector as a timm model whose `classifier` it replaced: that model (the
    reference, built here as LAION did) and capfilt's backbone + head give the same pwatermark
    from the same state dict, loaded strictly."""
    import timm

    torch.manual_seed(0)
    stock = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    stock.classifier = nn.Sequential(
        nn.Linear(stock.num_features, 625),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    stock.eval()
    ours = WatermarkDetector("test_efficientnet")
    ours.load_checkpoint_state(stock.state_dict())
    ours.eval()
    assert set(ours.checkpoint_state()) == set(stock.state_dict())
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(ours(pixels).numpy(), torch.softmax(stock(pixels), -1)[:, 0].numpy(), atol=1e-6)
    # the published one: efficientnet_b3(a)'s 1536 pooled features into Linear(1536, 625)
    published = WatermarkDetector("efficientnet_b3").checkpoint_state()
    assert tuple(published["classifier.0.weight"].shape) == (625, 1536)
    assert tuple(published["classifier.5.weight"].shape) == (2, 256)
    missing = dict(stock.state_dict())
    missing.pop("classifier.5.bias")
    with pytest.raises(RuntimeError, match="classifier|Missing"):
        WatermarkDetector("test_efficientnet").load_checkpoint_state(missing)


def test_a_head_for_another_embedding_model_is_refused_in_one_line():
    from capfilt.stages.quality import Quality

    config = load_config(RECIPE, ["clip.0.embeddings=null", "clip.1.embeddings=image"])  # RN embeds now
    with pytest.raises(ValueError) as err:
        Quality(config.quality, config.clip, device="cpu")
    message = str(err.value)
    assert "\n" not in message and "tiny-clip-rn" in message and "tiny-aesthetic" in message


def test_scores_come_from_the_written_embeddings_and_the_decoded_pixels(run):
    from capfilt.io.shards import image_member, read_shard
    from capfilt.stages.decode import Decode

    out, urls = run
    samples = _samples(out)
    meta = pq.read_table(out / "embeddings" / "metadata" / "00000.parquet").to_pylist()
    emb = np.load(out / "embeddings" / "img_emb" / "00000.npy").astype(np.float32)
    aesthetic = Head("tiny-aesthetic", "test", kind="laion_aesthetic", device="cpu").score_embeddings(emb)
    punsafe = Head("tiny-nsfw", "test", kind="laion_nsfw", device="cpu").score_embeddings(emb)
    for m, a, p in zip(meta, aesthetic, punsafe):  # float16 files: the run scored float32 features
        assert samples[m["key"]]["aesthetic"] == pytest.approx(a, abs=2e-3)
        assert samples[m["key"]]["punsafe"] == pytest.approx(p, abs=2e-3)
    decode = Decode(16, 50_000_000, 256)
    raw = [s for s in read_shard(urls[0])]
    batch = decode(
        {"image_bytes": [image_member(s)[1] for s in raw], "failure": [""] * len(raw), "detail": [""] * len(raw),
         "key": [s.key for s in raw]}
    )  # fmt: skip
    watermark = Head("tiny-watermark", "test", kind="laion_watermark", device="cpu").score_images(batch["image"])
    for s, w in zip(raw, watermark):
        assert samples[s.key]["pwatermark"] == pytest.approx(float(w), abs=1e-5)
    laion = {r["key"]: r for r in pq.read_table(out / "laion" / "00000.parquet").to_pylist()}
    assert all(laion[k]["punsafe"] == pytest.approx(samples[k]["punsafe"], abs=1e-6) for k in laion)


@pytest.mark.parametrize(
    ("rule", "score", "reason"),
    [
        ("decide.aesthetic.min", "aesthetic", Reason.AESTHETIC_BELOW_MIN),
        ("decide.punsafe.max", "punsafe", Reason.UNSAFE),
        ("decide.pwatermark.max", "pwatermark", Reason.WATERMARKED),
    ],
)
def test_rethreshold_applies_an_image_rule_with_no_model_loaded(run, tmp_path, monkeypatch, rule, score, reason):
    from capfilt.modeling import captioner, clip_reranker, heads
    from capfilt.rethreshold import rethreshold

    def refuse(*a, **k):
        raise AssertionError("rethreshold loaded a model")

    for cls in (clip_reranker.ClipReranker, heads.Head, heads.WatermarkDetector, captioner.Captioner):
        monkeypatch.setattr(cls, "__init__", refuse)
    out, _ = run
    rows = [r for p in sorted((out / "ledger").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    values = sorted({r["key"]: r[score] for r in rows if r[score] is not None}.values())
    cut = float(np.median(values))
    derived = tmp_path / "derived"
    summary = rethreshold(str(out), str(derived), overrides=[f"{rule}={cut}"])
    by_key = {}
    for p in sorted((derived / "ledger").glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            by_key.setdefault(r["key"], []).append(r)
    fires = (lambda v: v < cut) if score == "aesthetic" else (lambda v: v > cut)
    for cands in by_key.values():
        if cands[0]["sample_status"] == FAILED:
            continue
        if fires(cands[0][score]):
            assert cands[0]["sample_status"] == REJECTED
            assert {c["reason"] for c in cands} <= {
                reason,
                Reason.WEB_TEXT_EMPTY,
                Reason.CAPTION_EMPTY,
                Reason.DUPLICATE_TEXT,
            }
            assert reason in {c["reason"] for c in cands}
        else:
            assert reason not in {c["reason"] for c in cands}
    n_fired = sum(fires(c[0][score]) for c in by_key.values() if c[0]["sample_status"] != FAILED)
    assert n_fired > 0
    stats = [json.loads(p.read_text()) for p in (derived / "stats").glob("*.json")]
    assert sum(s["rejected_by_reason"].get(reason, 0) for s in stats) == n_fired
    assert summary["input"] == summary["kept"] + summary["rejected"] + summary["failed"]
    assert json.loads((derived / "run.json").read_text())["config"]["decide"][score] == (
        {"min": cut} if score == "aesthetic" else {"max": cut}
    )


def test_the_input_column_wins_when_the_recipe_says_so(monkeypatch):
    from capfilt.stages.watermark import Watermark

    config = parse_config(
        {"watermark": {"model": "tiny-watermark", "prefer": "input"}, "decide": {"web": {}, "synthetic": {}}}
    )
    stage = Watermark(config.watermark, device="cpu")
    image = np.zeros((64, 64, 3), np.uint8)
    batch = {"key": ["a", "b"], "failure": ["", ""], "detail": ["", ""], "image": [image, image],
             "laion_meta": [{"pwatermark": 0.875}, {}]}  # fmt: skip
    out = stage(batch)
    assert out["pwatermark"][0] == 0.875  # the sidecar's
    assert out["pwatermark"][1] == pytest.approx(float(stage.model.score_images([image])[0]))  # computed
    computed = Watermark(
        parse_config({"watermark": {"model": "tiny-watermark"}, "decide": {"web": {}, "synthetic": {}}}).watermark
    )
    assert computed(batch)["pwatermark"][0] != 0.875


def test_a_nan_image_score_fails_the_sample_and_a_rule_needs_its_model():
    from capfilt.config import DecideConfig
    from capfilt.stages.decide import with_image_rules

    cands = [{"source": "web", "text": "a", "reason": ""}]
    d = {"status": KEPT, "failure": "", "kept": [True], "reasons": [""], "selected": 0}
    policy = DecideConfig(aesthetic={"min": 5.0})
    failed = with_image_rules(d, cands, {"aesthetic": float("nan")}, policy)
    assert (failed["status"], failed["failure"]) == (FAILED, Reason.NONFINITE_SCORE)
    assert with_image_rules(d, cands, {"aesthetic": 6.0}, policy) == d
    with pytest.raises(ConfigError, match="decide.aesthetic is set but no `quality.aesthetic` model"):
        parse_config({"decide": {"web": {}, "synthetic": {}, "aesthetic": {"min": 5}}})


def test_calibrate_chooses_an_image_rule_that_rethreshold_replays(run, tmp_path, capsys):
    from capfilt.cli import main
    from capfilt.rethreshold import rethreshold

    out, _ = run
    assert main(["calibrate", str(out), "--score", "punsafe", "--keep-rate", "image=0.5"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[: printed.index("#")])
    assert result["rule"] == "max" and result["keep_rate"] == 0.5
    summary = rethreshold(str(out), str(tmp_path / "d"), overrides=[f"decide.punsafe.max={result['threshold']}"])
    stats = [json.loads(p.read_text()) for p in (tmp_path / "d" / "stats").glob("*.json")]
    unsafe = sum(s["rejected_by_reason"].get(Reason.UNSAFE, 0) for s in stats)
    assert unsafe == result["images"] - round(0.5 * result["images"])
    assert summary["input"] == summary["kept"] + summary["rejected"] + summary["failed"]
    assert main(["calibrate", str(out), "--score", "punsafe", "--keep-rate", "web=0.5"]) != 0
    assert "give --keep-rate image=RATE" in capsys.readouterr().err


def test_the_report_shows_each_image_scores_histogram_with_its_rule(run, tmp_path):
    from capfilt.report import build_report
    from capfilt.rethreshold import rethreshold

    out, _ = run
    page = build_report(out, out=tmp_path / "r.html").read_text()
    assert "<h2>Image scores</h2>" in page
    for score in ("aesthetic", "punsafe", "pwatermark"):
        assert f'data-score="{score}"' in page
    rethreshold(str(out), str(tmp_path / "d"), overrides=["decide.pwatermark.max=0.5"])
    page = build_report(tmp_path / "d", out=tmp_path / "d.html").read_text()
    assert "limit 0.5" in page
    assert "Nearest the pwatermark cut (0.5)" in page  # examples at the cut, both sides
