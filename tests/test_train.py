"""Training: losses fall, exact resume after a kill, config strictness, data sources, the CLI."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from capfilt import synthetic
from capfilt.cli.train import add_parsers
from capfilt.config import ConfigError
from capfilt.train import checkpoint
from capfilt.train.config import load_train_config, parse_train_config
from capfilt.train.data import TrainSet, augment_image, batch_plan, load_coco, load_shards
from capfilt.train.loop import lr_at, train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on 2 shared cores: one thread is far faster
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    examples = synthetic.make_split("clean", 48, seed=0, image_size=64)
    return synthetic.write_coco(root, examples, captions_per_image=2)


def _cfg(out, data, **overrides):
    base = {
        "task": "pretrain",
        "output": str(out),
        "model": {"preset": "tiny-blip"},
        "data": [{"kind": "coco", "path": data}],
        "steps": 8,
        "batch_size": 8,
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "med": {"queue_size": 12, "alpha_warmup_steps": 4},
        "log_every": 2,
        "save_every": 3,
    }
    base.update(overrides)
    return parse_train_config(base)


def test_losses_fall_on_a_small_synthetic_set(clean_set, tmp_path):
    cfg = _cfg(
        tmp_path / "run",
        clean_set,
        steps=40,
        batch_size=16,
        save_every=100,
        med={"momentum": False, "queue_size": 0},
        optim={"lr": 1e-3, "warmup_steps": 4},
    )
    history = train(cfg, progress=False)["losses"]
    for part in ("itc", "itm", "lm", "loss"):
        first = sum(r[part] for r in history[:5]) / 5
        last = sum(r[part] for r in history[-5:]) / 5
        assert last < first, f"{part}: {first:.3f} -> {last:.3f}"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(2, 41, 2))


def test_killed_and_resumed_run_follows_the_same_trajectory(clean_set, tmp_path):
    """8 steps straight vs. a run killed after step 5 (last checkpoint: step 3) and resumed; with
    gradient accumulation, momentum encoders and queues on."""
    whole = train(_cfg(tmp_path / "a", clean_set, grad_accum=2), progress=False)
    killed = train(_cfg(tmp_path / "b", clean_set, grad_accum=2), progress=False, stop_after=5)
    assert killed["step"] == 5 and checkpoint.latest(tmp_path / "b").name == "step-00000003"
    resumed = train(_cfg(tmp_path / "b", clean_set, grad_accum=2), progress=False, resume=True)
    assert [r["step"] for r in resumed["losses"]] == [4, 5, 6, 7, 8]
    straight = [r["loss"] for r in whole["losses"]]
    stitched = [r["loss"] for r in killed["losses"][:3]] + [r["loss"] for r in resumed["losses"]]
    assert stitched == pytest.approx(straight, abs=1e-6, rel=0)
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]  # the step-4 line of the killed run was replaced, not duplicated
    wa, wb = (load_file(str(tmp_path / r / "med" / "med.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refusals(clean_set, tmp_path):
    train(_cfg(tmp_path / "r", clean_set, steps=3), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(tmp_path / "r", clean_set, steps=3), progress=False)
    with pytest.raises(ConfigError, match="optim"):
        train(_cfg(tmp_path / "r", clean_set, steps=3, optim={"lr": 5e-4}), progress=False, resume=True)


def test_a_key_added_since_a_run_was_saved_is_no_change_on_resume(clean_set, tmp_path):
    cfg = _cfg(tmp_path / "o", clean_set)
    saved = cfg.fingerprint_data()
    del saved["augment"]  # as written by a version before augmentation existed
    assert cfg.changed_since(saved) == []
    assert cfg.changed_since({**saved, "steps": 99}) == ["steps"]
    assert _cfg(tmp_path / "o", clean_set, augment={"hflip": True}).changed_since(saved) == ["augment"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        parse_train_config(
            {
                "task": "pretrain",
                "model": {"preset": "tiny-blip"},
                "steps": 1,
                "data": [{"kind": "coco", "path": "x.json"}],
                "optim": {"learning_rate": 1},
            }
        )
    with pytest.raises(ConfigError, match="exactly one of preset"):
        parse_train_config(
            {
                "task": "pretrain",
                "model": {"preset": "tiny-blip", "med": "x"},
                "steps": 1,
                "data": [{"kind": "coco", "path": "x.json"}],
            }
        )
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "task": "pretrain",
                "model": {"preset": "tiny-blip"},
                "steps": 1,
                "data": [{"kind": "coco", "path": "x.json"}],
            }
        )
    )
    with pytest.raises(ConfigError, match="task 'pretrain'"):
        load_train_config(path, "finetune-filter", output=str(tmp_path / "o"))
    cfg = load_train_config(path, "pretrain", ["optim.lr=0.01", "workers=2"], output=str(tmp_path / "o"))
    assert cfg.optim.lr == 0.01 and cfg.workers == 2 and cfg.loss_weights() == {"itc": 1, "itm": 1, "lm": 1}


def test_augmentation_is_drawn_per_epoch_and_item_and_off_by_default(clean_set):
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor(size={"height": 64, "width": 64})
    items = load_coco(clean_set)
    plain = TrainSet(items, processor)
    cfg = _cfg("unused", clean_set, augment={"crop_scale": [0.6, 0.9], "hflip": True})
    augmented = TrainSet(items, processor, cfg.augment)
    assert _cfg("unused", clean_set).augment.crop_scale is None  # off unless asked for

    def pixels(dataset, epoch, index=3):
        return dataset[(epoch, index, 0)][0]

    # Without augmentation every epoch sees the same pixels; with it, a resumed or re-run epoch
    # sees the same crop again (the draw is a function of seed, epoch and item), another epoch not.
    assert torch.equal(pixels(plain, 0), pixels(plain, 1))
    assert torch.equal(pixels(augmented, 0), pixels(augmented, 0))
    assert not torch.equal(pixels(augmented, 0), pixels(augmented, 1))
    assert pixels(augmented, 0).shape == pixels(plain, 0).shape
    assert plain[(0, 3, 0)][1] == augmented[(0, 3, 0)][1]  # the text drawn does not move


def test_augment_image_crops_and_mirrors():
    from PIL import Image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :8] = 255  # a white band on the left
    image = Image.fromarray(rgb)
    rng = np.random.default_rng(0)
    assert np.array_equal(np.asarray(augment_image(image, rng, crop_scale=(1.0, 1.0))), rgb)
    mirrored = [np.asarray(augment_image(image, np.random.default_rng(s), hflip=True)) for s in range(8)]
    flipped = [m for m in mirrored if m[:, -1].mean() > 200]
    assert 0 < len(flipped) < 8 and all(np.array_equal(m, rgb[:, ::-1]) for m in flipped)
    cropped = np.asarray(augment_image(image, np.random.default_rng(1), crop_scale=(0.25, 0.25)))
    assert cropped.shape == rgb.shape and not np.array_equal(cropped, rgb)
    with pytest.raises(ConfigError, match="crop_scale"):
        _cfg("unused", "x.json", augment={"crop_scale": [0.9, 0.5]})


def test_batch_plan_splits_each_batch_over_workers_and_resumes():
    whole = batch_plan(20, 4, seed=1, start=0)
    batches = [next(whole) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    for b in range(12):
        shares = [next(batch_plan(20, 4, seed=1, start=b, rank=r, world=2)) for r in range(2)]
        assert shares[0] + shares[1] == batches[b]
    assert sorted(i for b in batches[:5] for _, i, _ in b) == list(range(20))
    assert lr_at(0, _cfg("x", "x.json", optim={"lr": 1.0, "warmup_steps": 2})) == 0.5


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_shards_cleaned_and_plain(tmp_path):
    """Cleaned shards train on every kept text (json "texts"); plain WebDataset on the .txt."""
    ex = synthetic.make_split("s", 3, seed=0, image_size=32)
    cleaned = {
        "texts": [{"text": "web  text", "source": "web"}, {"text": "a synthetic caption", "source": "synthetic"}]
    }
    _tar(
        tmp_path / "cleaned.tar",
        [("k0.jpg", ex[0].image), ("k0.txt", b"a synthetic caption"), ("k0.json", json.dumps(cleaned).encode())],
    )
    _tar(
        tmp_path / "plain.tar",
        [("k1.jpg", ex[1].image), ("k1.txt", b"plain text"), ("k2.txt", b"no image here"), ("k3.jpg", ex[2].image)],
    )
    items = load_shards(str(tmp_path / "*.tar"))
    assert [(i.key, i.texts) for i in items] == [("k0", ["web text", "a synthetic caption"]), ("k1", ["plain text"])]
    assert items[0].image_bytes() == ex[0].image  # read back by offset


def test_cli_finetune_then_eval(clean_set, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers(dest="command"))
    config = tmp_path / "cap.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny-blip"},
                "data": [{"kind": "coco", "path": clean_set}],
                "steps": 2,
                "batch_size": 8,
                "log_every": 1,
            }
        )
    )
    out = tmp_path / "cap"
    args = ap.parse_args(
        ["train", "finetune-captioner", str(config), "--output", str(out), "--quiet", "--set", "optim.lr=1e-4"]
    )
    assert args.func(args) == 0
    assert sorted(json.loads((out / "outputs.json").read_text())) == ["captioner", "med"]
    args = ap.parse_args(
        [
            "eval",
            "--captioner",
            str(out / "captioner"),
            "--filter",
            "tiny-blip",
            "--coco",
            clean_set,
            "--max-images",
            "6",
            "--k-test",
            "3",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert args.func(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 6 and 0 <= result["captioning"]["bleu4"] <= 1
    assert set(result["retrieval"]["itm"]) == {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert "BLEU-4" in capsys.readouterr().out


def test_decoder_input_starts_with_the_models_start_token():
    """The LM input starts from the model config's bos ([DEC]), as the captioner and stock
    `generate` do, also when a checkpoint's tokenizer declares no bos token."""
    from transformers import BertTokenizer

    from capfilt.modeling.presets import blip_config, blip_processor, load_preset, models_dir
    from capfilt.train.data import Collate

    spec = load_preset("tiny-blip")
    tok, bos = blip_processor(spec).tokenizer, blip_config(spec).text_config.bos_token_id
    assert tok.bos_token_id == bos  # the presets agree: the default changes nothing for them
    rows = [(torch.zeros(3, 4, 4), "a red circle", 0), (torch.zeros(3, 4, 4), "two blue squares", 1)]
    plain = BertTokenizer(vocab=str(models_dir() / spec["tokenizer"] / "vocab.txt"))  # no bos token declared
    assert plain.bos_token_id is None
    batch = Collate(plain, "a picture of ", 35, 40, bos_token_id=bos)(rows)
    assert batch["dec_input_ids"][:, 0].tolist() == [bos, bos]
    assert torch.equal(batch["dec_input_ids"], Collate(tok, "a picture of ", 35, 40)(rows)["dec_input_ids"])
    with pytest.raises(ValueError, match="no decoder start token"):
        Collate(plain, "a picture of ", 35, 40)
