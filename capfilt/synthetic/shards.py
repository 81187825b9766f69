"""Writing the world to disk as capfilt's inputs: img2dataset-style WebDataset shards (with parquet
sidecars, optional upstream failures and, on request, a broken sample of every kind) and COCO-style
caption sets. What `capfilt synth` runs (`main_synth`).

Every file is a pure function of its examples and seed: the same examples give the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from capfilt.io.output import tar_members
from capfilt.io.shards import IMAGE_EXTENSIONS
from capfilt.records import Reason
from capfilt.synthetic.broken import image_cases
from capfilt.synthetic.drawing import DEFAULT_IMAGE_SIZE
from capfilt.synthetic.splits import CLEAN, NOISE_TYPES, Example, make_example, make_split, name_seed
from capfilt.synthetic.text import describe, phrasings
from capfilt.synthetic.world import random_scene

_TMP = ".tmp-"  # a file is written as "{name}.tmp-{pid}" and renamed into place once complete


@dataclass
class _Entry:
    """One sample as written: its members, its sidecar row (None leaves the key out of the
    sidecar) and, for injected broken samples, what was broken and the expected reason."""

    key: str
    members: dict[str, bytes]
    sidecar: dict | None
    expected: str | None = None
    what: str | None = None  # set for every injected sample; those go into the manifest
    occurrence: int = 0


def _url(key: str) -> str:
    return f"https://example.com/img/{key}.jpg"


def _meta(ex: Example | None, key: str, expected: str | None = None, what: str | None = None) -> bytes:
    meta = {
        "key": key,
        "url": _url(key),
        "truth": ex.truth if ex else None,
        "noise": ex.noise if ex else None,
        "swapped": ex.swapped if ex else None,
        "scene": dataclasses.asdict(ex.scene) if ex else None,
        "expected": expected,
    }
    if what is not None:
        meta["broken"] = what
    return json.dumps(meta).encode()


def _entry(ex: Example) -> _Entry:
    return _Entry(
        key=ex.key,
        members={"jpg": ex.image, "txt": ex.text.encode(), "json": _meta(ex, ex.key)},
        sidecar={"key": ex.key, "url": _url(ex.key), "caption": ex.text, "status": "success"},
    )


def _slug(name: str) -> str:
    # A key must not contain "." (WebDataset splits key and extension at the first one).
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:40] or "case"


def _broken_entries(seed: int, image_size: int):
    """The injected samples: (rng for their placement, samples to spread over the shards, the
    duplicate-key trio, the sample the last shard is cut inside)."""
    rng = np.random.default_rng([seed, name_seed("broken")])
    serial = itertools.count()

    def scene_entry(slug: str, expected: str | None, what: str) -> tuple[_Entry, Example]:
        key = f"broken-{next(serial):03d}-{slug}"
        ex = make_example(key, rng, CLEAN, image_size)
        entry = _entry(ex)
        entry.members["json"] = _meta(ex, key, expected, what)
        entry.expected, entry.what = expected, what
        return entry, ex

    spread = []
    for case in image_cases():
        key = f"broken-{next(serial):03d}-{_slug(case.name)}"
        text = describe(random_scene(rng), rng)  # any caption: the image is not a scene
        what = f"image case {case.name}"
        spread.append(
            _Entry(
                key=key,
                members={case.ext: case.data, "txt": text.encode(), "json": _meta(None, key, case.reason, what)},
                sidecar={"key": key, "url": _url(key), "caption": text, "status": "success"},
                expected=case.reason,
                what=what,
            )
        )

    missing_txt, _ = scene_entry("no_txt", Reason.WEB_TEXT_MISSING, "no .txt member and no sidecar row")
    del missing_txt.members["txt"]
    missing_txt.sidecar = None  # a sidecar caption would stand in for the missing .txt
    empty_txt, _ = scene_entry("blank_txt", Reason.WEB_TEXT_EMPTY, "whitespace-only .txt")
    empty_txt.members["txt"] = b" \t\n  "
    empty_txt.sidecar["caption"] = " \t\n  "
    no_image, _ = scene_entry("no_image", Reason.MISSING_IMAGE, "no image member")
    del no_image.members["jpg"]
    spread += [missing_txt, empty_txt, no_image]

    first, ex = scene_entry("dup", None, "duplicated key, first copy (valid)")
    between, _ = scene_entry("not_utf8", Reason.WEB_TEXT_NOT_UTF8, "non-UTF-8 .txt")
    between.members["txt"] = b"\xff\xfe bad"
    between.sidecar["caption"] = None
    second = _Entry(
        key=first.key,
        members={**first.members, "json": _meta(ex, first.key, Reason.DUPLICATE_KEY, "duplicated key, second copy")},
        sidecar=None,  # one sidecar row per key
        expected=Reason.DUPLICATE_KEY,
        what="duplicated key, second copy",
        occurrence=1,
    )
    truncated, _ = scene_entry("truncated", Reason.TRUNCATED_TAR, "tar cut inside this sample's image data")
    return rng, spread, [first, between, second], truncated


def _write_tar(path: Path, entries: list[_Entry], truncate_last: bool) -> None:
    """The entries' members ("{key}.{ext}", extensions in sorted order) as one tar, written as the
    cleaned output shards are (io.output.tar_members); with truncate_last the file is cut
    halfway through the last entry's image data."""
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    cut = None
    with open(tmp, "wb") as f:
        for i, entry in enumerate(entries):
            for ext in sorted(entry.members):
                data = entry.members[ext]
                f.write(tar_members([(f"{entry.key}.{ext}", data)]))
                if truncate_last and i == len(entries) - 1 and cut is None and ext in IMAGE_EXTENSIONS:
                    # The file ends with the padded data block; cut halfway through the data.
                    cut = f.tell() - tarfile.BLOCKSIZE * math.ceil(len(data) / tarfile.BLOCKSIZE) + len(data) // 2
        # The end of the archive, as tarfile writes it: two zero blocks, padded to a whole record.
        end = f.tell() + 2 * tarfile.BLOCKSIZE
        f.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        if cut is not None:
            f.truncate(cut)
    os.replace(tmp, path)


def _write_sidecar(path: Path, entries: list[_Entry], upstream: list[dict] = ()) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [e.sidecar for e in entries if e.sidecar is not None] + list(upstream)
    columns = ("key", "url", "caption", "status") + (("error_message",) if upstream else ())
    table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns})
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# (status, error_message) of samples img2dataset attempted and did not write, as it records them.
UPSTREAM_FAILURES = (
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>"),
    ("failed_to_resize", "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>"),
    (
        "failed_to_download",
        "HTTPSConnectionPool(host='example.com', port=443): Max retries exceeded with url: "
        "/img/missing.jpg (Caused by SSLError(SSLCertVerificationError(1, '[SSL: "
        "CERTIFICATE_VERIFY_FAILED] certificate verify failed')))",
    ),
)


def _upstream_rows(shard: str, n: int) -> list[dict]:
    """n img2dataset-style failed rows: keys the tar does not hold, UPSTREAM_FAILURES in turn."""
    rows = []
    for i in range(n):
        status, message = UPSTREAM_FAILURES[i % len(UPSTREAM_FAILURES)]
        key = f"upstream-{shard}-{i:04d}"
        rows.append(
            {
                "key": key,
                "url": _url(key),
                "caption": f"never downloaded {i}",
                "status": status,
                "error_message": message,
            }
        )
    return rows


def _write_i2d_stats(path: Path, written: int, upstream: list[dict]) -> None:
    """img2dataset's {shard}_stats.json for a shard with `written` samples in its tar."""
    status_dict: dict[str, int] = {"success": written} if written else {}
    for r in upstream:
        status_dict[r["error_message"]] = status_dict.get(r["error_message"], 0) + 1
    stats = {
        "count": written + len(upstream),
        "successes": written,
        "failed_to_download": sum(r["status"] == "failed_to_download" for r in upstream),
        "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in upstream),
        "duration": 0.0,
        "start_time": 0.0,
        "end_time": 0.0,
        "status_dict": status_dict,
    }
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=4))
    os.replace(tmp, path)


def _image_size_of(examples: list[Example]) -> int:
    if not examples:
        return DEFAULT_IMAGE_SIZE
    with Image.open(io.BytesIO(examples[0].image)) as im:
        return im.size[0]


def write_shards(
    out_dir,
    examples: list[Example],
    *,
    per_shard: int,
    broken: bool = False,
    seed: int = 0,
    sidecar: bool = True,
    upstream_failed: int = 0,
) -> list[str]:
    """Write examples as img2dataset-style WebDataset shards 00000.tar, 00001.tar, ... (plus
    {shard}.parquet sidecars); returns the shard paths.

    upstream_failed=n adds, per shard, n samples that img2dataset "attempted but failed"
    (UPSTREAM_FAILURES in turn): rows in the sidecar with their status and error_message and no
    member in the tar, and a {shard}_stats.json with img2dataset's counts.

    broken=True mixes in samples of every failure class (one per broken.image_cases()
    case, missing/empty/non-UTF-8 text, missing image, a duplicated key) and cuts the last shard
    inside its final sample's image. Each injected sample's .json carries its "expected" reason
    and out_dir/broken_manifest.json lists them all, including the truncated one whose .json is lost.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = [[_entry(ex) for ex in examples[i : i + per_shard]] for i in range(0, len(examples), per_shard)]
    manifest_path = out / "broken_manifest.json"
    if broken:
        groups = groups or [[]]
        rng, spread, duplicate, truncated = _broken_entries(seed, _image_size_of(examples))
        for j, entry in enumerate(spread):
            group = groups[j % len(groups)]
            group.insert(int(rng.integers(0, len(group) + 1)), entry)
        groups[0].extend(duplicate)  # another sample sits between the two copies
        groups[-1].append(truncated)
    elif manifest_path.exists():
        manifest_path.unlink()  # a stale manifest would describe samples these shards do not have

    paths, manifest = [], []
    for s, entries in enumerate(groups):
        shard = f"{s:05d}"
        path = out / f"{shard}.tar"
        _write_tar(path, entries, truncate_last=broken and s == len(groups) - 1)
        upstream = _upstream_rows(shard, upstream_failed)
        if sidecar:
            _write_sidecar(out / f"{shard}.parquet", entries, upstream)
        if upstream:
            _write_i2d_stats(out / f"{shard}_stats.json", len(entries), upstream)
        else:
            (out / f"{shard}_stats.json").unlink(missing_ok=True)  # a stale one would count failures
        paths.append(str(path))
        manifest += [
            {"shard": shard, "key": e.key, "occurrence": e.occurrence, "expected": e.expected, "what": e.what}
            for e in entries
            if e.what is not None
        ]
    if broken:
        tmp = manifest_path.with_name(f"{manifest_path.name}{_TMP}{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, manifest_path)
    return paths


def write_coco(out_dir, examples: list[Example], *, captions_per_image: int = 1) -> str:
    """A COCO-style clean set: out_dir/images/{key}.jpg and out_dir/captions.json with the TRUE
    captions (file_name is relative to out_dir). With captions_per_image > 1, further distinct
    true phrasings are added, like COCO's five captions per image. Returns the json path."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, ex in enumerate(examples):
        file_name = f"images/{ex.key}.jpg"
        (out / file_name).write_bytes(ex.image)
        with Image.open(io.BytesIO(ex.image)) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": file_name, "key": ex.key, "width": width, "height": height})
        captions = [ex.truth]
        if captions_per_image > 1:
            others = [t for t in phrasings(ex.scene) if t != ex.truth]
            rng = np.random.default_rng([name_seed(ex.key), 7])
            picked = rng.choice(len(others), size=min(captions_per_image - 1, len(others)), replace=False)
            captions += [others[int(j)] for j in picked]
        for caption in captions:
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": caption})
    path = out / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}, indent=1) + "\n")
    return str(path)


def main_synth(
    out_dir, shards: int, per_shard: int, *, noise: float = 0.3, broken: bool = False, seed: int = 0
) -> dict:
    """What `capfilt synth` runs: shards x per_shard web examples (a `noise` share of wrong texts),
    optionally with broken samples; returns a summary of what was written."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    examples = make_split("web", shards * per_shard, seed=seed, noise_share=noise)
    paths = write_shards(out_dir, examples, per_shard=per_shard, broken=broken, seed=seed)
    noisy = {t: sum(ex.noise == t for ex in examples) for t in NOISE_TYPES}
    summary = {
        "out": str(out_dir),
        "shards": len(paths),
        "examples": len(examples),
        "clean": len(examples) - sum(noisy.values()),
        "noisy": noisy,
        "samples": len(examples),
    }
    if broken:
        manifest = json.loads((Path(out_dir) / "broken_manifest.json").read_text())
        by_reason: dict[str, int] = {}
        for row in manifest:
            if row["expected"] is not None:
                by_reason[row["expected"]] = by_reason.get(row["expected"], 0) + 1
        summary["samples"] += len(manifest)
        summary["broken"] = dict(sorted(by_reason.items()))
        summary["injected_valid"] = sum(row["expected"] is None for row in manifest)
        summary["manifest"] = str(Path(out_dir) / "broken_manifest.json")
    return summary
