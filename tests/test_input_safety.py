"""Never harm the input, never emit an unsafe name (issue 14, item 5), on real files.

- the output location may not be, hold or lie inside an input shard's folder (refused before
  anything is written or deleted);
- --fresh deletes only what capfilt wrote;
- keys unsafe as tar member names are failed (unsafe_key), never written;
- dotted keys ("abc.def.jpg" + "abc.def.txt") keep their web text and URL;
- one run at a time per output (a lock naming its holder; a stale one is taken over).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.cli import main
from capfilt.io.apart import OutputOverlapsInput, check_apart
from capfilt.io.names import LOCK_FILE
from capfilt.io.run_dir import RunDir
from capfilt.io.run_lock import OutputLocked, RunLock, describe_holder
from capfilt.io.shards import check_member_name, key_warning, read_shard, text_of, unsafe_name_reason, url_of
from capfilt.pipeline import run
from capfilt.records import SAMPLE_FAILURE_REASONS, Reason
from capfilt.synthetic import main_synth

KEEP_ALL = ["decide.web.itm=0", "decide.synthetic.itm=0"]  # every scored text kept: texts reach the tar


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes ("dir" for a folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def jpeg(seed: int, size: int = 32) -> bytes:
    img = Image.new("RGB", (size, size), ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list, fmt=tarfile.PAX_FORMAT, encoding="utf-8") -> Path:
    """members: (name, bytes) or (name, bytes, pax_headers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tf:
        for name, data, *pax in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            if pax:
                info.pax_headers = pax[0]
            tf.addfile(info, io.BytesIO(data))
    return path


def ledger(out: Path) -> list[dict]:
    return pq.read_table(sorted((out / "ledger").glob("*.parquet"))).to_pylist()


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small img2dataset-like corpus: DIR/shards/0000{0,1}.tar (+ the synth's own files)."""
    root = tmp_path_factory.mktemp("corpus")
    main_synth(root / "shards", shards=2, per_shard=4, seed=2)
    return root


# --------------------------------------------------------------------------- output vs input


@pytest.mark.parametrize("where", ["equal", "inside", "contains", "contains-via-link"])
@pytest.mark.parametrize("fresh", [False, True], ids=["plain", "fresh"])
def test_output_overlapping_an_input_folder_is_refused_and_touches_nothing(
    tmp_path, where, fresh, capsys, tiny, tiny_recipe
):
    data = tmp_path / "data"
    main_synth(data / "shards", shards=1, per_shard=2, seed=1)
    # A previous capfilt run's files and a user's file in what would be the output: --fresh would
    # have deleted them, a run would have overwritten them.
    (data / "shards" / "ledger").mkdir()
    (data / "shards" / "ledger" / "00000.parquet").write_bytes(b"precious")
    (data / "run.json").write_text("{}")
    if where == "contains-via-link":
        (tmp_path / "link").symlink_to(data)
    output = {
        "equal": data / "shards",
        "inside": data / "shards" / "out",
        "contains": data,
        "contains-via-link": tmp_path / "link",
    }[where]
    before = snapshot(tmp_path)
    argv = ["run", str(tiny_recipe), "--input", str(data / "shards" / "*.tar"), "--output", str(output), "--quiet"]
    assert main([*argv, "--fresh"] if fresh else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capfilt: error: output ") and "input shard" in err and "\n" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
    with pytest.raises(OutputOverlapsInput):
        run(tiny([data / "shards" / "00000.tar"], output, thresholds=KEEP_ALL), fresh=fresh, progress=False)
    assert snapshot(tmp_path) == before


def test_check_apart_on_paths_and_urls(tmp_path):
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "0.tar"
    shard.write_bytes(b"")
    check_apart(tmp_path / "out", [str(shard)])  # a sibling folder is fine
    check_apart(tmp_path / "in-other", [str(shard)])  # a shared name prefix is not containment
    with pytest.raises(OutputOverlapsInput, match="lies inside"):
        check_apart(tmp_path / "in" / "sub", [str(shard)])
    with pytest.raises(OutputOverlapsInput, match=" is the folder"):
        check_apart(tmp_path / "x" / ".." / "in", [str(shard)])
    with pytest.raises(OutputOverlapsInput, match="contains"):
        check_apart(f"file://{tmp_path}", [str(shard)])
    # A shard that is a link: the folder it points into counts too.
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "0.tar").symlink_to(shard)
    with pytest.raises(OutputOverlapsInput):
        check_apart(tmp_path / "in" / "out", [str(tmp_path / "links" / "0.tar")])
    # fsspec URLs compare by store and normalized path, without any request.
    check_apart("s3://bucket/out", ["s3://bucket/in/0.tar"])
    check_apart("gs://bucket/in", ["s3://bucket/in/0.tar"])  # another store
    for out in ("s3://bucket/in", "s3a://bucket/in/", "s3://bucket", "s3://bucket/in/x/"):
        with pytest.raises(OutputOverlapsInput):
            check_apart(out, ["s3://bucket/in/0.tar"])
    with pytest.raises(OutputOverlapsInput):
        check_apart("memory://a/b", ["memory://a/b/c/0.tar"])


# --------------------------------------------------------------------------- --fresh


def test_fresh_deletes_only_what_capfilt_wrote(corpus, tmp_path, caplog, tiny):
    out = tmp_path / "out"
    shards = sorted((corpus / "shards").glob("*.tar"))
    assert run(tiny(shards, out, thresholds=KEEP_ALL), progress=False).ok
    # A user's files next to capfilt's, in its folders and at the top.
    foreign = {
        "notes.txt": b"mine",
        "shards/README.md": b"user readme",
        "shards/00000.tar.bak": b"a backup",
        "shards/sub/00000.tar": b"in a folder of the user's",
        "ledger/analysis.ipynb": b"{}",
        "stats/00000.json.orig": b"{}",
        "_done/keep": b"",
    }
    for rel, data in foreign.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "shards" / "link.tar").symlink_to(out / "notes.txt")
    # A leftover of this output's run (a temp name of its shard 00000): deleted. A file under
    # capfilt's names of a shard no run of this output recorded (99999): not capfilt's, kept.
    (out / "shards" / "99999.tar").write_bytes(b"old")
    (out / "ledger" / f"00000.parquet.tmp-{'ab12cd34'}").write_bytes(b"partial")

    with caplog.at_level(logging.WARNING, logger="capfilt"):
        result = run(tiny(shards[:1], out, ["captioner.top_p=0.5"], thresholds=KEEP_ALL), fresh=True, progress=False)
    assert result.ok
    for rel, data in foreign.items():
        assert (out / rel).read_bytes() == data, rel
    assert (out / "shards" / "link.tar").is_symlink()
    assert (out / "shards" / "99999.tar").read_bytes() == b"old"
    assert not list(out.rglob("*.tmp-*"))
    # The new run's outputs are complete; the old run's shard 00001 is gone with --fresh.
    assert sorted(p.name for p in (out / "_done").glob("*.done")) == ["00000.done"]
    assert not (out / "shards" / "00001.tar").exists() and not (out / "ledger" / "00001.parquet").exists()
    assert json.loads((out / "run.json").read_text())["config"]["captioner"]["top_p"] == 0.5
    assert "--fresh left" in caplog.text and "notes.txt" not in caplog.text.split("--fresh left")[0]
    assert "shards/README.md" in caplog.text


def test_clear_removes_capfilt_folders_once_empty(tmp_path):
    out = tmp_path / "out"
    for rel in (
        "shards/a.tar",
        "ledger/a.parquet",
        "stats/a.json",
        "laion/a.parquet",
        "_done/a.done",
        "summary.json",
        "run.json.tmp-0123abcd",
    ):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    (out / "run.json").write_text(json.dumps({"fingerprint": "f", "config": {}, "shards": ["a"]}))
    (out / "stats" / "a.tar").write_bytes(b"a tar where capfilt writes json: not capfilt's")
    foreign = RunDir(out).clear()
    assert foreign == [str(out / "stats" / "a.tar")]  # (as locations: a path here, a URL on a store)
    # Root temp names are left to the sweep (OutputFolder.sweep, run by prepare); the folders capfilt emptied are gone.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "run.json.tmp-0123abcd",
        "stats",
        "stats/a.tar",
    ]


# --------------------------------------------------------------------------- unsafe keys


UNSAFE = {
    # tar member name -> key as it shows in the ledger
    "../evil.jpg": "../evil",
    "/abs/olute.jpg": "/abs/olute",
    "dir/inner.jpg": "dir/inner",
    "back\\slash.jpg": "back\\slash",
    "ctl\x01char.jpg": "ctl\x01char",
    "new\nline.jpg": "new\nline",
    "del\x7f.jpg": "del\x7f",
}


def test_unsafe_name_reason():
    for key in ("00001", "abc.def", "caf\u00e9 \u00fc", "a b", "x-y_z+1", "..."):
        assert unsafe_name_reason(key) is None, key
        assert check_member_name(f"{key}.jpg") == f"{key}.jpg"
    for key in ("", ".", "..", "a/b", "/a", "a\\b", "a\x00b", "a\tb", "a\x85b", "k\udcff"):
        assert unsafe_name_reason(key), repr(key)
        with pytest.raises(ValueError, match="unsafe tar member name"):
            check_member_name(key)
    assert Reason.UNSAFE_KEY in SAMPLE_FAILURE_REASONS


def test_unsafe_keys_fail_with_their_reason_and_never_reach_the_tar(tmp_path, caplog, tiny):
    members = [("good.jpg", jpeg(0)), ("good.txt", b"a good text")]
    for i, name in enumerate(UNSAFE):
        members += [(name, jpeg(i + 1)), (name[:-4] + ".txt", f"text {i}".encode())]
    members += [
        ("nul.jpg", jpeg(20), {"path": "nul\x00byte.jpg"}),
        ("nul.txt", b"t", {"path": "nul\x00byte.txt"}),
        # A member extension with a control character fails its sample too.
        ("ext.jpg", jpeg(21)),
        ("ext.txt", b"t"),
        ("ext.x\x02.png", b"?"),
        ("good2.jpg", jpeg(22)),
        ("good2.txt", b"another good text"),
    ]
    shard = write_tar(tmp_path / "in" / "00000.tar", members)
    # Names that are not UTF-8 (a latin-1 ustar header) cannot even go into the ledger as they are.
    latin = write_tar(
        tmp_path / "in" / "00001.tar",
        [("k\xff.jpg", jpeg(23)), ("k\xff.txt", b"t"), ("fine.jpg", jpeg(24)), ("fine.txt", b"t")],
        fmt=tarfile.USTAR_FORMAT,
        encoding="latin-1",
    )

    out = tmp_path / "out"
    result = run(tiny([shard, latin], out, thresholds=KEEP_ALL), progress=False)
    assert result.ok, result.shard_errors
    rows = ledger(out)
    failed = {r["key"]: r for r in rows if r["candidate"] == -1}
    expected_unsafe = {*UNSAFE.values(), "nul\x00byte", "ext", "k\\xff"}
    assert set(failed) == expected_unsafe
    assert all(r["reason"] == Reason.UNSAFE_KEY and r["sample_status"] == "failed" for r in failed.values())
    kept = {r["key"] for r in rows if r["sample_status"] == "kept"}
    assert kept == {"good", "good2", "fine"}
    # Accounting: input = kept + rejected + failed, per shard and for the run.
    for stats in (json.loads(p.read_text()) for p in (out / "stats").glob("*.json")):
        assert stats["input"] == stats["kept"] + stats["rejected"] + stats["failed"]
    assert result.summary["input"] == len(expected_unsafe) + 3
    assert result.summary["failed_by_reason"] == {Reason.UNSAFE_KEY: len(expected_unsafe)}
    # The cleaned tars hold only safe names: nothing to climb out of an extraction folder with.
    for tar in (out / "shards").glob("*.tar"):
        names = tar_names(tar)
        assert names and all(unsafe_name_reason(n) is None for n in names), names
        assert {n.rsplit(".", 1)[0] for n in names} <= {"good", "good2", "fine"}
        with tarfile.open(tar) as tf:
            tf.extractall(tmp_path / "extracted", filter="data")  # the strict filter raises on nothing
    assert not (tmp_path / "evil.jpg").exists()


def test_keys_that_print_alike_are_one_key_and_its_duplicate(tmp_path):
    # "k\xff" as a latin-1 byte (not UTF-8) prints as the literal key "k\\xff": the ledger must still
    # hold each (key, occurrence) once.
    shard = write_tar(
        tmp_path / "00000.tar",
        [("k\xff.jpg", b"1"), ("k\\xff.jpg", b"2"), ("ok.jpg", b"3")],
        fmt=tarfile.USTAR_FORMAT,
        encoding="latin-1",
    )
    samples = list(read_shard(str(shard)))
    assert [(s.key, s.occurrence, s.failure) for s in samples] == [
        ("k\\xff", 0, Reason.UNSAFE_KEY),
        ("k\\xff", 1, Reason.UNSAFE_KEY),
        ("ok", 0, None),
    ]
    assert "not valid UTF-8" in samples[0].detail and "already seen" in samples[1].detail


# --------------------------------------------------------------------------- keys that vanish or mislead

NFC_KEY, NFD_KEY = "caf\u00e9", "cafe\u0301"  # one word, two spellings that display alike
RLO_KEY, ZWSP_KEY = "photo\u202egpj.exe", "zero\u200bwidth"


def test_dot_keys_and_hidden_names_are_read_as_samples(tmp_path):
    """WebDataset skips a basename starting with "." (key "." from "..jpg", ".." from "...jpg"):
    capfilt reads a run of dots as a key, so that the sample is counted (issue 22 item 13)."""
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("..jpg", jpeg(1)),
            ("..txt", b"dot"),
            ("...jpg", jpeg(2)),
            ("...txt", b"dot dot"),
            ("....jpg", jpeg(3)),
            (".hidden.jpg", jpeg(5)),  # one dot: a hidden file, no key (as in WebDataset)
            ("ok.jpg", jpeg(4)),
        ],
    )
    samples = [(s.key, s.failure, sorted(s.members)) for s in read_shard(str(shard))]
    assert samples == [
        (".", Reason.UNSAFE_KEY, ["jpg", "txt"]),
        ("..", Reason.UNSAFE_KEY, ["jpg", "txt"]),
        ("...", None, ["jpg"]),  # safe to write; flagged: WebDataset readers skip it
        ("ok", None, ["jpg"]),
    ]
    assert "WebDataset readers skip" in key_warning("...") and key_warning("ok") is None


def test_a_key_no_file_system_can_hold_is_unsafe(tmp_path):
    """A member name over 255 bytes is a valid tar name that no reader can extract (issue 22 item 14):
    the longest member capfilt writes ({key}.json) must fit."""
    fits, over = "k" * 250, "k" * 251  # {key}.json: 255 and 256 bytes
    shard = write_tar(
        tmp_path / "00000.tar", [(f"{k}.{ext}", b"x") for k in (fits, over, "k" * 300) for ext in ("jpg", "txt")]
    )
    samples = list(read_shard(str(shard)))
    assert [s.failure for s in samples] == [None, Reason.UNSAFE_KEY, Reason.UNSAFE_KEY]
    assert "256 bytes, over the 255 a file name may have" in samples[1].detail
    assert "over the 255" in unsafe_name_reason("k" * 256) and unsafe_name_reason("k" * 255) is None
    with pytest.raises(ValueError, match="unsafe tar member name"):
        check_member_name("k" * 300 + ".jpg")


def test_vanishing_and_misleading_keys_end_to_end(tmp_path, tiny):
    """Every member group is counted; unsafe names fail; keys that display as other names are kept,
    flagged in the ledger's key_warning, and the cleaned tar extracts."""
    normal = [(f"n{i}", jpeg(10 + i)) for i in range(3)]
    flagged = [NFD_KEY, RLO_KEY, ZWSP_KEY]
    members = []
    for i, key in enumerate([k for k, _ in normal] + [NFC_KEY, *flagged]):
        members += [(f"{key}.jpg", jpeg(20 + i)), (f"{key}.txt", f"a picture number {i}".encode())]
    members += [("..jpg", jpeg(1)), ("..txt", b"dot"), ("...jpg", jpeg(2)), ("...txt", b"dot dot")]
    members += [("k" * 300 + ".jpg", jpeg(3)), ("k" * 300 + ".txt", b"long")]
    shard = write_tar(tmp_path / "in" / "00000.tar", members)
    out = tmp_path / "out"
    result = run(tiny([shard], out, thresholds=KEEP_ALL), progress=False)
    assert result.ok, result.shard_errors
    stats = json.loads((out / "stats" / "00000.json").read_text())
    assert stats["input"] == 3 + 1 + len(flagged) + 3  # every group: 10, none vanished
    assert stats["failed_by_reason"] == {Reason.UNSAFE_KEY: 3}
    rows = ledger(out)
    warnings = {r["key"]: r["key_warning"] for r in rows}
    assert warnings[NFC_KEY] is None and warnings["n0"] is None
    assert "NFC" in warnings[NFD_KEY] and repr(NFC_KEY) in warnings[NFD_KEY]
    assert "U+202E RIGHT-TO-LEFT OVERRIDE" in warnings[RLO_KEY]
    assert "U+200B ZERO WIDTH SPACE" in warnings[ZWSP_KEY]
    assert {r["key"] for r in rows if r["sample_status"] != "failed"} == {"n0", "n1", "n2", NFC_KEY, *flagged}
    with tarfile.open(out / "shards" / "00000.tar") as tf:
        tf.extractall(tmp_path / "extracted", filter="data")
    assert {p.name.rsplit(".", 1)[0] for p in (tmp_path / "extracted").iterdir()} == {
        "n0",
        "n1",
        "n2",
        NFC_KEY,
        *flagged,
    }


# --------------------------------------------------------------------------- dotted keys


def test_dotted_keys_split_by_the_documented_rule(tmp_path):
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("abc.def.jpg", b"i1"),
            ("abc.def.txt", b"web text of abc.def"),
            ("abc.def.json", json.dumps({"url": "http://x/abc.def.jpg"}).encode()),
            ("Photo.V2.JPG", b"i2"),
            ("Photo.V2.TXT", b"case kept"),  # key keeps its case
            ("img.1.jpg", b"i3"),
            ("img.1.txt", b"one"),
            ("img.2.jpg", b"i4"),
            ("img.2.txt", b"two"),
            ("wds.jpg", b"i5"),
            ("wds.txt", b"plain"),
            ("wds.seg.png", b"mask"),  # multi-part field: one sample
            ("a.b.c.jpg", b"i6"),
            ("a.b.c.txt", b"three parts"),
        ],
        fmt=tarfile.USTAR_FORMAT,
    )
    samples = list(read_shard(str(shard)))
    assert [(s.key, sorted(s.members)) for s in samples] == [
        ("abc.def", ["jpg", "json", "txt"]),
        ("Photo.V2", ["jpg", "txt"]),
        ("img.1", ["jpg", "txt"]),
        ("img.2", ["jpg", "txt"]),
        ("wds", ["jpg", "seg.png", "txt"]),
        ("a.b.c", ["jpg", "txt"]),
    ]
    assert all(s.failure is None for s in samples)
    assert text_of(samples[0]) == ("web text of abc.def", None)
    assert url_of(samples[0]) == "http://x/abc.def.jpg"
    assert [text_of(s)[0] for s in samples[1:4]] == ["case kept", "one", "two"]


def test_dotted_key_repeated_is_a_duplicate_and_truncation_marks_its_group(tmp_path):
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("k.a.jpg", b"1"),
            ("k.a.txt", b"t"),
            ("z.jpg", b"2"),
            ("k.a.jpg", b"3"),
            ("k.a.txt", b"t"),
            ("k.b.jpg", b"4"),
            ("k.c.jpg", b"5"),
            ("k.c.txt", b"t" * 2000),
        ],
        fmt=tarfile.USTAR_FORMAT,
    )
    samples = list(read_shard(str(shard)))
    assert [(s.key, s.occurrence, s.failure) for s in samples] == [
        ("k.a", 0, None),
        ("z", 0, None),
        ("k.a", 1, Reason.DUPLICATE_KEY),
        ("k.b", 0, None),
        ("k.c", 0, None),
    ]
    with tarfile.open(shard) as tf:
        inside_last = tf.getmembers()[-1].offset_data + 100
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(shard.read_bytes()[:inside_last])  # inside k.c.txt's data: the k.* group is unfinished
    samples = list(read_shard(str(cut)))
    # "k.a.jpg" ... "k.c.txt" are one WebDataset group (key "k"): every sample split from the group
    # being read at the break is truncated, since more of its members might have followed.
    assert [(s.key, s.occurrence, s.failure) for s in samples] == [
        ("k.a", 0, None),
        ("z", 0, None),
        ("k.a", 1, Reason.TRUNCATED_TAR),
        ("k.b", 0, Reason.TRUNCATED_TAR),
        ("k.c", 0, Reason.TRUNCATED_TAR),
    ]
    assert "already seen" in samples[2].detail and "tar ended" in samples[2].detail


def test_dotted_key_keeps_its_web_text_and_url_end_to_end(tmp_path, tiny):
    url = "http://example.com/abc.def.jpg"
    shard = write_tar(
        tmp_path / "in" / "00000.tar",
        [
            ("abc.def.jpg", jpeg(1)),
            ("abc.def.txt", b"a dotted key's web text"),
            ("abc.def.json", json.dumps({"url": url}).encode()),
            ("plain.jpg", jpeg(2)),
            ("plain.txt", b"a plain key's web text"),
        ],
    )
    out = tmp_path / "out"
    assert run(tiny([shard], out, thresholds=KEEP_ALL), progress=False).ok
    web = {r["key"]: r for r in ledger(out) if r["source"] == "web"}
    assert web["abc.def"]["text"] == "a dotted key's web text" and web["abc.def"]["reason"] == ""
    assert web["abc.def"]["url"] == url
    names = tar_names(out / "shards" / "00000.tar")
    assert {"abc.def.jpg", "abc.def.txt", "abc.def.json"} <= set(names)
    # The cleaned shard reads back under the same key, with the web text among the kept texts.
    (again,) = [s for s in read_shard(str(out / "shards" / "00000.tar")) if s.key == "abc.def"]
    meta = json.loads(again.members["json"])
    assert meta["web_text"] == "a dotted key's web text" and meta["url"] == url
    assert any(t["source"] == "web" and t["text"] == meta["web_text"] for t in meta["texts"])


def test_training_data_reads_keys_by_the_same_rule(tmp_path):
    """Training reads a local tar by offset (images never held in memory) and any other shard by
    streaming it: both find the samples the input reader finds, dotted keys and "./" names included."""
    import fsspec

    from capfilt.train.data import load_shards

    images = [jpeg(i) for i in range(4)]
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("abc.def.jpg", images[0]),
            ("abc.def.txt", b"a dotted key"),
            ("./dot.jpg", images[1]),
            ("./dot.txt", b"a ./ name"),
            ("wds.jpg", images[2]),
            ("wds.seg.png", b"mask"),
            ("wds.txt", b"a multi-part field"),
            ("a.b.c.jpg", images[3]),
            ("a.b.c.txt", b"three parts"),
        ],
    )
    expected = [(s.key, [text_of(s)[0]]) for s in read_shard(str(shard))]
    assert [k for k, _ in expected] == ["abc.def", "dot", "wds", "a.b.c"]
    memory = fsspec.filesystem("memory")
    memory.pipe("/train-keys/00000.tar", shard.read_bytes())
    try:
        streamed = load_shards("memory://train-keys/00000.tar")
    finally:
        memory.rm("/train-keys", recursive=True)
    for items in (load_shards(str(shard)), streamed):
        assert [(i.key, i.texts) for i in items] == expected
        assert [i.image_bytes() for i in items] == images


# --------------------------------------------------------------------------- the lock


HOLD = """
from capfilt.io.run_lock import RunLock
import sys, time
lock = RunLock(sys.argv[1], heartbeat_s=0.2)
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_refuses_naming_the_holder_then_takes_over_once_it_died(
    corpus, tmp_path, capsys, caplog, tiny_recipe
):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        before = snapshot(out)
        argv = [
            "run",
            str(tiny_recipe),
            "--input",
            str(corpus / "shards" / "00000.tar"),
            "--output",
            str(out),
            "--quiet",
            *[a for s in KEEP_ALL for a in ("--set", s)],
        ]
        assert main([*argv, "--fresh"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("capfilt: error: ") and "\n" not in err
        assert f"pid {proc.pid}" in err and f"host {os.uname().nodename}" in err and "started 20" in err
        assert snapshot(out).keys() == before.keys()  # nothing written or deleted meanwhile
    finally:
        proc.kill()  # a killed run: its lock stays behind, naming a pid that no longer runs
        proc.wait()
    assert (out / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="capfilt"):
        assert main(argv) == 0
    assert "taking over the stale lock" in caplog.text and f"process {proc.pid} is not running" in caplog.text
    assert (out / "_done" / "00000.done").exists()
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_lock_is_released_on_error_and_on_ctrl_c(corpus, tmp_path, monkeypatch, tiny):
    out = tmp_path / "out"
    shard = corpus / "shards" / "00000.tar"
    assert run(tiny([shard], out, thresholds=KEEP_ALL), progress=False).ok
    from capfilt.io.run_dir import ResumeRefused

    with pytest.raises(ResumeRefused):
        run(tiny([shard], out, ["captioner.top_p=0.5"], thresholds=KEEP_ALL), progress=False)
    assert not (out / LOCK_FILE).exists()

    import capfilt.runners.local as local

    def interrupted(*args, **kwargs):
        assert (out / LOCK_FILE).exists()  # held while the run runs
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "run_local", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny([shard], out, thresholds=KEEP_ALL), progress=False)
    assert not (out / LOCK_FILE).exists()


def test_lock_record_heartbeat_and_staleness_rules(tmp_path, caplog):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    with lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())
        assert first["pid"] == os.getpid() and first["host"] == os.uname().nodename and first["token"] == lock.token
        # Until the heartbeat thread rewrites the record (however long a loaded machine takes; a
        # heartbeat that never comes is a hang, which pytest-timeout ends).
        while (beat := json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]) == first["heartbeat"]:
            time.sleep(0.01)
        assert beat > first["heartbeat"]
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a live holder, even in this very process
    assert not (tmp_path / LOCK_FILE).exists()

    def plant(**record):
        (tmp_path / LOCK_FILE).write_text(json.dumps({"started": "2020-01-01T00:00:00+00:00", **record}))

    # Another machine: its pid cannot be checked, its heartbeat decides.
    plant(host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(OutputLocked, match="host elsewhere"):
        RunLock(tmp_path, stale_s=60).acquire()
    plant(host="elsewhere", pid=1, heartbeat=time.time() - 120)
    with caplog.at_level(logging.WARNING, logger="capfilt"):
        with RunLock(tmp_path, stale_s=60):
            pass
    assert "no heartbeat for 120 s" in caplog.text
    # This machine, but a pid reused by another process (its start tick differs): stale.
    ident = {k: v for k, v in first.items() if k not in ("token", "heartbeat", "started")}  # this process's
    if ident["pid_start"] is not None:
        plant(**{**ident, "pid_start": "1", "heartbeat": time.time()})
        assert "another process" in RunLock(tmp_path).stale_reason(json.loads((tmp_path / LOCK_FILE).read_text()))
    # An unreadable record counts as held until its file is older than the timeout.
    (tmp_path / LOCK_FILE).write_text("{not json")
    with pytest.raises(OutputLocked, match="unreadable"):
        RunLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with RunLock(tmp_path, stale_s=60):
        pass
    assert "unreadable" in describe_holder({"unreadable": "x", "heartbeat": 0})


def test_sweep_removes_only_capfilt_temporaries(tmp_path):
    from capfilt.io.folder import OutputFolder

    (tmp_path / "shards").mkdir()
    ours = [tmp_path / "shards" / "00000.tar.tmp-0a1b2c3d", tmp_path / "summary.json.tmp-deadbeef"]
    theirs = [tmp_path / "notes.tmp-1", tmp_path / "shards" / "draft.tmp-x.txt", tmp_path / "data.json.tmp-ZZZZZZZZ"]
    for p in ours + theirs:
        p.write_text("x")
    assert sorted(OutputFolder(tmp_path).sweep()) == sorted(map(str, ours))
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)
