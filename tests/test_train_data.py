"""Training data reads shards through CapFilt's own tar reader (io.shards.read_shard): the same
samples, keys and failures, whether a local tar is indexed by offset or a shard is streamed."""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from capfilt.io.shards import ShardReadError, read_shard
from capfilt.records import Reason
from capfilt.train.data import load_shards


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


def test_training_takes_a_web_text_by_capfilts_rule(tmp_path):
    """The web text training learns from is the one CapFilt scores: the .txt, else the img2dataset
    sidecar's caption; a text CapFilt rejects (not UTF-8, empty, too long) is skipped under
    CapFilt's reason, not decoded with replacement characters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("side.jpg", jpeg(0)),  # no .txt: the sidecar's caption
            ("latin.jpg", jpeg(1)),
            ("latin.txt", "café".encode("latin-1")),
            ("blank.jpg", jpeg(2)),
            ("blank.txt", b"  \n"),
            ("long.jpg", jpeg(3)),
            ("long.txt", b"x" * 5000),
            ("plain.jpg", jpeg(4)),
            ("plain.txt", b"  a  dog\n"),
        ],
    )
    pq.write_table(
        pa.table({"key": ["side", "plain"], "caption": ["a cat on a mat", "ignored: the .txt wins"]}),
        tmp_path / "00000.parquet",
    )
    skipped: Counter = Counter()
    items = load_shards(str(shard), skipped=skipped)
    assert [(i.key, i.texts) for i in items] == [("side", ["a cat on a mat"]), ("plain", ["a dog"])]
    assert skipped == Counter({Reason.WEB_TEXT_NOT_UTF8: 1, Reason.WEB_TEXT_EMPTY: 1, Reason.WEB_TEXT_TOO_LONG: 1})


def test_training_skips_what_the_capfilt_reader_fails_and_never_merges(tmp_path, caplog):
    """One tar reader for CapFilt and training. A key that comes back (later in the shard, or with
    an extension repeated) is the first copy plus a duplicate_key failure for both; the sample a tar
    breaks off in is truncated_tar for both. Training skips exactly those, counts and logs them by
    reason, and never merges two copies into one sample (the old training index did: "dup" had the
    first copy's image with the second copy's text, "twice" the second copy's text). The same holds
    for a local tar read by offset, a streamed one, and a gzipped tar named ".tar"."""
    images = [jpeg(i) for i in range(5)]
    shard = write_tar(
        tmp_path / "plain" / "00000.tar",
        [
            ("dup.jpg", images[0]),  # first copy of "dup": an image, no text
            ("solo.jpg", images[1]),
            ("solo.txt", b"alone"),
            ("dup.txt", b"the second copy's text"),  # "dup" comes back: a later copy
            ("twice.jpg", images[2]),
            ("twice.txt", b"first"),
            ("twice.jpg", images[3]),  # an extension repeated: a later copy of "twice"
            ("twice.txt", b"second"),
            ("cut.txt", b"the tar breaks off in my image"),
            ("cut.jpg", images[4]),
        ],
    )
    with tarfile.open(shard) as tf:
        cut = tf.getmember("cut.jpg")
    shard.write_bytes(shard.read_bytes()[: cut.offset_data + cut.size // 2])

    verdicts = {(s.key, s.occurrence): s.failure for s in read_shard(str(shard))}
    assert verdicts == {
        ("dup", 0): None,
        ("solo", 0): None,
        ("dup", 1): Reason.DUPLICATE_KEY,
        ("twice", 0): None,
        ("twice", 1): Reason.DUPLICATE_KEY,
        ("cut", 0): Reason.TRUNCATED_TAR,
    }

    gz = tmp_path / "gz" / "00000.tar"  # compressed, though named as a plain tar: no offsets
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(shard.read_bytes(), mtime=0))
    memory = fsspec.filesystem("memory")
    memory.pipe("/train-dups/00000.tar", shard.read_bytes())
    try:
        for spec in (str(shard), "memory://train-dups/00000.tar", str(gz)):
            skipped: Counter = Counter()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="capfilt.train.data"):
                items = load_shards(spec, skipped=skipped)
            assert [(i.key, i.texts) for i in items] == [("solo", ["alone"]), ("twice", ["first"])], spec
            assert [i.image_bytes() for i in items] == [images[1], images[2]], spec
            assert skipped == Counter({Reason.DUPLICATE_KEY: 2, Reason.TRUNCATED_TAR: 1, Reason.WEB_TEXT_MISSING: 1}), (
                spec
            )
            assert "skipped 4 of 6 samples" in caplog.text and "duplicate_key: 2" in caplog.text, spec
    finally:
        memory.rm("/train-dups", recursive=True)
    for local in (str(shard), f"file://{shard}", f"local://{shard}"):  # io.folder.is_local's names
        assert [i.offset >= 0 for i in load_shards(local)] == [True, True], local  # by offset, not held


def test_a_shard_that_is_no_tar_stops_training_naming_it(tmp_path):
    """CapFilt fails a shard it cannot read as a tar at all (ShardReadError); training does not
    train on what is left as if the shard had been empty (the old index counted it truncated_tar)."""
    write_tar(tmp_path / "00000.tar", [("k.jpg", jpeg(0)), ("k.txt", b"fine")])
    (tmp_path / "00001.tar").write_bytes(b"<html>not a tar</html>" * 40)
    with pytest.raises(ShardReadError, match="00001.tar"):
        load_shards(str(tmp_path / "*.tar"))
