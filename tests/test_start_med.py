"""The loop from published checkpoints (`start_med: {captioner, filter}`): the MEDs it fine-tunes
from compute exactly what the stock models they came from compute, hub ids take the same
`from_pretrained` path as directories, and a loop on real-data layout runs from them.

The "published" checkpoints here are tiny stock `BlipForConditionalGeneration` /
`BlipForImageTextRetrieval` directories in the Salesforce layout (save_pretrained + processor),
built offline with *independent* random weights: like the real captioner and filter, which BLIP
fine-tuned apart, they share no weight.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt import synthetic
from capfilt.loop import parse_loop_config, role_init, run_loop, train_step_config
from capfilt.modeling.loading import from_pretrained
from capfilt.modeling.presets import blip_config, blip_processor, load_preset
from capfilt.train.loop import build_model

ROLES = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}
TASKS = {"captioner": "finetune-captioner", "filter": "finetune-filter"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    yield
    torch.set_num_threads(before)


def write_stock(directory: Path, role: str, seed: int) -> Path:
    """A stock checkpoint directory of the tiny architecture, weights drawn at 1/sqrt(fan-in) so that
    outputs depend clearly on image and text."""
    spec = load_preset("tiny-blip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ROLES[role](blip_config(spec))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 or name.endswith(("position_embedding", "class_embedding")):
                    p.normal_(0, max(1, p.shape[-1]) ** -0.5)
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(directory)
    blip_processor(spec).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("published")
    return {
        "captioner": str(write_stock(root / "blip-image-captioning", "captioner", seed=1)),
        "filter": str(write_stock(root / "blip-itm-coco", "filter", seed=2)),
    }


def _loop(start, **extra):
    return parse_loop_config(
        {
            "data": {"web": "web/*.tar", "clean": "clean.json", "test": "test.json"},
            "start_med": start,
            "pretrain": {"steps": 1},
            "finetune_captioner": {"steps": 1},
            "finetune_filter": {"steps": 1},
            **extra,
        }
    )


def _med(cfg, task: str, init: dict):
    """The MED a loop step starts from, built by the step's own config (`capfilt train`'s path)."""
    config = train_step_config(cfg, task, Path("unused"), init, [{"kind": "coco", "path": "unused"}])
    med, processor = build_model(config)
    return med.eval(), processor


def _inputs(processor, images, texts):
    pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    return pixels, tok.input_ids, tok.attention_mask


TEXTS = ["a picture of a red circle on the left", "a picture of two blue squares"]


def _captioner_logits(stock_dir, med, processor, images):
    pixels, ids, mask = _inputs(processor, images, TEXTS)
    ids[:, 0] = processor.tokenizer.bos_token_id  # the decoder starts from [DEC]
    model = from_pretrained(BlipForConditionalGeneration, stock_dir)
    with torch.no_grad():
        theirs = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        ours = med.lm_logits(med.image_embeds(pixels), ids, mask)
    return theirs, ours


def _filter_scores(stock_dir, med, processor, images):
    pixels, ids, mask = _inputs(processor, images, TEXTS)
    model = from_pretrained(BlipForImageTextRetrieval, stock_dir)
    with torch.no_grad():
        itm = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        itc = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        embeds = med.image_embeds(pixels)
        med_itm = med.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
        med_itc = med.image_feat(embeds) @ med.text_feat(ids, mask).t()
    return (itm, itc), (med_itm, med_itc)


def test_finetuning_meds_compute_what_the_published_models_compute(stock, images):
    cfg = _loop(stock)
    pair = images[:2]  # two different images (different sizes, too)
    captioner_init = role_init(cfg.start_init(), "captioner")
    assert captioner_init == {"captioner": stock["captioner"]}
    med, processor = _med(cfg, TASKS["captioner"], captioner_init)
    theirs, ours = _captioner_logits(stock["captioner"], med, processor, pair)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(theirs[0], theirs[1], atol=1e-3)  # the logits do depend on the image

    filter_init = role_init(cfg.start_init(), "filter")
    assert filter_init == {"filter": stock["filter"]}
    med, processor = _med(cfg, TASKS["filter"], filter_init)
    (itm, itc), (med_itm, med_itc) = _filter_scores(stock["filter"], med, processor, pair)
    torch.testing.assert_close(med_itm, itm, rtol=0, atol=1e-6)
    torch.testing.assert_close(med_itc, itc, rtol=0, atol=1e-6)
    assert float(itm.max() - itm.min()) > 1e-3 and float(itc.max() - itc.min()) > 1e-3


def test_the_pretraining_med_holds_the_filter_and_the_captioners_own_decoder(stock, images):
    """`retrain_from: start_med` pretrains from one MED built from both: it scores as the filter
    does (shared weights come from the filter), while its decoder keeps the captioner's
    self-attention and LM head on the filter's ViT and cross-attention, so its captioner logits are
    not the published captioner's. That is why each fine-tuning starts from its own checkpoint."""
    cfg = _loop(stock)
    assert cfg.retrain_init() == stock
    med, processor = _med(cfg, "pretrain", cfg.retrain_init())
    (itm, itc), (med_itm, med_itc) = _filter_scores(stock["filter"], med, processor, images[:2])
    torch.testing.assert_close(med_itm, itm, rtol=0, atol=1e-6)
    torch.testing.assert_close(med_itc, itc, rtol=0, atol=1e-6)
    captioner = from_pretrained(BlipForConditionalGeneration, stock["captioner"]).state_dict()
    own = med.state_dict()
    decoder_own = [
        k
        for k in captioner
        if k.startswith("text_decoder.cls.predictions.transform.")
        or (".attention." in k and k.startswith("text_decoder."))
    ]
    assert decoder_own and all(torch.equal(own[k], captioner[k]) for k in decoder_own)
    theirs, ours = _captioner_logits(stock["captioner"], med, processor, images[:2])
    assert (ours - theirs).abs().max() > 1e-2


def test_a_filter_only_start_fine_tunes_the_captioner_from_the_filter(stock):
    cfg = _loop({"filter": stock["filter"]})
    assert role_init(cfg.start_init(), "captioner") == {"filter": stock["filter"]}
    assert cfg.retrain_init() == {"filter": stock["filter"]}


def _hub_cache(root: Path, repo: str, source: str) -> None:
    """`source` laid out as the hub cache holds a download of `repo` (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(source).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


@pytest.mark.slow  # a fresh interpreter (torch + transformers import): ~12 s
def test_hub_ids_take_the_same_from_pretrained_path(stock, tmp_path):
    """Hub ids (as in pipelines/loop-blip.yaml) are loaded by `from_pretrained(hub id)`: here from
    a hub cache holding the tiny checkpoints under the Salesforce names, offline; a start checkpoint
    may pin its revision as ``org/name@revision``."""
    cache = tmp_path / "hub"
    names = {"captioner": "Salesforce/blip-image-captioning-base", "filter": "Salesforce/blip-itm-base-coco"}
    for role, repo in names.items():
        _hub_cache(cache, repo, stock[role])
    script = f"""
import json, torch
from capfilt.modeling.med_export import import_med
hub, _, report = import_med(captioner={names["captioner"]!r}, filter={names["filter"] + "@main"!r})
local, _, _ = import_med(captioner={stock["captioner"]!r}, filter={stock["filter"]!r})
a, b = hub.canonical_state_dict(), local.canonical_state_dict()
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a if k != "temp")
print(json.dumps({{"same": same, "loaded": len(report.loaded)}}))
"""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same"] and result["loaded"] > 0


def test_loop_on_real_data_layout_from_published_checkpoints(stock, tmp_path, monkeypatch):
    """`data: {web, clean, test}` (shards and COCO JSON files) from `start_med`:
    round 0 evaluates the published models as they are, round 1 fine-tunes each from its own
    checkpoint, CapFilts the web shards with the recipe's settings (nothing added by the loop) and
    pretrains from the published pair."""
    web = synthetic.write_shards(
        tmp_path / "data" / "web", synthetic.make_split("web", 32, seed=0, noise_share=0.4, image_size=48), per_shard=16
    )
    clean = synthetic.write_coco(
        tmp_path / "data" / "clean", synthetic.make_split("clean", 24, seed=0, image_size=48), captions_per_image=2
    )
    test = synthetic.write_coco(tmp_path / "data" / "test", synthetic.make_split("test", 12, seed=0, image_size=48))
    monkeypatch.chdir(tmp_path)  # relative data paths, as a user's recipe has them
    rel = lambda p: os.path.relpath(p, tmp_path)
    train = {"steps": 2, "batch_size": 8, "save_every": 2, "log_every": 1, "med": {"momentum": False, "queue_size": 0}}
    cfg = parse_loop_config(
        {
            "output": "loop",
            "data": {
                "web": [rel(p) for p in web],
                "clean": rel(clean),
                "test": rel(test),
                "clean_images": "data/clean",
                "test_images": "data/test",
            },
            "start_med": stock,
            "eval_k": 4,
            "min_improvement": 0,
            "pretrain": train,
            "finetune_captioner": train,
            "finetune_filter": train,
            "capfilt": {
                "captioner": {"num_captions": 2, "min_new_tokens": 2, "max_new_tokens": 6},
                "decide": {"web": {"itm": 0.3}, "synthetic": {"itm": 0.3}},
            },
        }
    )
    state = run_loop(cfg)
    rounds = {(r["round"], r["ablation"]): r for r in state["rounds"]}
    assert set(rounds) == {(0, "-"), (1, "captioner_filter")}
    assert rounds[(0, "-")]["trained_on"] == "start checkpoints"
    r1 = rounds[(1, "captioner_filter")]
    assert r1["capfilt_input"] == 32 and 0 <= r1["r1"] <= 100  # a recall in percent (NaN fails)

    out = tmp_path / "loop"

    def model_of(step):
        config = json.loads((out / "round-1" / step / "train_config.json").read_text())["config"]
        return {k: v for k, v in config["model"].items() if v}

    assert model_of("captioner") == {"captioner": stock["captioner"]}
    assert model_of("filter") == {"filter": stock["filter"]}
    assert model_of("pretrain-captioner_filter") == stock
    data = json.loads((out / "round-1" / "captioner" / "train_config.json").read_text())["config"]["data"]
    assert data == [{"kind": "coco", "path": str(clean), "images": str(tmp_path / "data" / "clean")}]
    run = json.loads((out / "round-1" / "capfilt-captioner_filter" / "run.json").read_text())["config"]
    assert run["captioner"]["model"] == str(out / "round-1" / "captioner" / "captioner")
    assert run["filter"]["model"] == str(out / "round-1" / "filter" / "filter")
    assert run["input"] == [str(p) for p in web]  # absolute: resolvable from anywhere
    assert run["decode"]["max_side"] == 1024 and run["batch_size"] == 32 and run["runner"] == "local"
    assert (run["captioner"]["num_captions"], run["captioner"]["min_new_tokens"]) == (2, 2)
    # The round's MED was pretrained from the published pair and exports loadable stock models.
    from_pretrained(BlipForImageTextRetrieval, str(Path(r1["med"]).parent / "filter"))
