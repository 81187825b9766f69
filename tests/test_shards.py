"""Shard listing and the robust WebDataset tar reader, on real tar/parquet files."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.io.shards import (
    RawSample,
    ShardReadError,
    expand_shards,
    image_member,
    read_shard,
    shard_id,
    text_of,
    url_of,
)
from capfilt.records import Reason

# --------------------------------------------------------------------------- helpers


def tar_bytes(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    """A ustar archive (one 512-byte header per member, so offsets are easy to reason about)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info in extra:
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, members, extra=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members, extra))
    return str(path)


def sample_members(n: int) -> list[tuple[str, bytes]]:
    """n samples of jpg + txt; sizes vary so cuts land in data of different lengths."""
    out = []
    for i in range(n):
        key = f"{i:05d}"
        out.append((f"{key}.jpg", bytes([i + 1]) * (300 + 400 * i)))
        out.append((f"{key}.txt", f"caption {i}".encode()))
    return out


def write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def sample(members=None, sidecar=None) -> RawSample:
    return RawSample(shard="s", key="k", occurrence=0, members=members or {}, sidecar=sidecar)


# --------------------------------------------------------------------------- expand_shards


def test_brace_range_expands_in_order(tmp_path):
    for i in range(4):
        touch(tmp_path / f"{i:05d}.tar")
    got = expand_shards(str(tmp_path / "{00000..00003}.tar"))
    assert got == [str(tmp_path / f"{i:05d}.tar") for i in range(4)]


def test_brace_list_glob_and_list_keep_given_order_and_dedupe(tmp_path):
    a, b = touch(tmp_path / "a" / "x.tar"), touch(tmp_path / "b" / "y.tar")
    for name in ("03", "01", "02"):
        touch(tmp_path / "g" / f"{name}.tar")
    touch(tmp_path / "g" / "notes.txt")

    assert expand_shards(str(tmp_path / "{b,a}" / "*.tar")) == [b, a]
    got = expand_shards([b, str(tmp_path / "g" / "*.tar"), a, b])
    assert got == [b] + [str(tmp_path / "g" / f"{n}.tar") for n in ("01", "02", "03")] + [a]


def test_missing_path_or_empty_glob_raises_naming_it(tmp_path):
    present = touch(tmp_path / "00000.tar")
    missing = str(tmp_path / "00001.tar")
    with pytest.raises(FileNotFoundError, match="00001.tar"):
        expand_shards([present, missing])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    # Every gap of a range is named, not only the first.
    with pytest.raises(FileNotFoundError, match="00001.tar.*00002.tar"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))


def test_directory_and_empty_spec_are_errors(tmp_path):
    with pytest.raises(IsADirectoryError):
        expand_shards(str(tmp_path))
    with pytest.raises(ValueError):
        expand_shards([])


def test_same_shard_id_twice_raises(tmp_path):
    touch(tmp_path / "a" / "00000.tar")
    touch(tmp_path / "b" / "00000.tar.gz")
    with pytest.raises(ValueError, match="00000"):
        expand_shards(str(tmp_path / "*" / "00000.*"))


def test_file_and_local_url_globs_name_the_files(tmp_path):
    """file:// and local:// name this machine's files (io.folder.is_local): globbed as the plain
    path is, each shard named by its path."""
    for name in ("b", "a"):
        touch(tmp_path / f"{name}.tar")
    for scheme in ("file://", "local://"):
        got = expand_shards(f"{scheme}{tmp_path}/*.tar")
        assert got == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], scheme


@pytest.mark.parametrize(
    "url, expected",
    [
        ("data/00012.tar", "00012"),
        ("s3://bucket/d/00012.tar", "00012"),
        ("x.tar.gz", "x"),
        ("x.tgz", "x"),
        ("shard.v1.tar", "shard.v1"),
        ("memory:///t/00003.tar.xz", "00003"),
    ],
)
def test_shard_id(url, expected):
    assert shard_id(url) == expected


# --------------------------------------------------------------------------- grouping


def test_grouping_follows_webdataset_key_rule(tmp_path):
    directory = tarfile.TarInfo("a/b")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("zz.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "a/b/000.x.jpg"
    path = write_tar(
        tmp_path / "00000.tar",
        [
            ("__meta__", b"ignored"),
            ("a/b/000.x.jpg", b"img0"),
            ("a/b/000.TXT", b"text0"),
            ("a/b/.hidden", b"ignored"),
            ("a/b/000.json", b"{}"),
            ("001.jpg", b"img1"),
            ("README", b"no extension: not a sample member"),
            ("001.txt", b"text1"),
        ],
        extra=[directory, link],
    )
    samples = list(read_shard(path))
    assert [(s.key, sorted(s.members)) for s in samples] == [
        ("a/b/000", ["json", "txt", "x.jpg"]),
        ("001", ["jpg", "txt"]),
    ]
    assert all(s.occurrence == 0 and s.shard == "00000" for s in samples)
    # A key with directories cannot be a safe member name of the cleaned tar: failed, not dropped.
    assert [s.failure for s in samples] == [Reason.UNSAFE_KEY, None]
    assert image_member(samples[0]) == ("x.jpg", b"img0")
    assert image_member(samples[1]) == ("jpg", b"img1")
    assert samples[0].members["txt"] == b"text0"


def test_duplicate_keys_get_occurrence_and_reason(tmp_path):
    path = write_tar(
        tmp_path / "dup.tar",
        [
            ("a.jpg", b"a0"),
            ("a.txt", b"t0"),
            ("b.jpg", b"b0"),
            ("a.jpg", b"a1"),  # the key comes back later
            ("a.txt", b"t1"),
            ("a.jpg", b"a2"),  # repeats an extension of the sample being built
        ],
    )
    got = [(s.key, s.occurrence, s.failure, s.members.get("jpg")) for s in read_shard(path)]
    assert got == [
        ("a", 0, None, b"a0"),
        ("b", 0, None, b"b0"),
        ("a", 1, Reason.DUPLICATE_KEY, b"a1"),
        ("a", 2, Reason.DUPLICATE_KEY, b"a2"),
    ]
    dup = list(read_shard(path))[2]
    assert "#0" in dup.detail and "a.jpg" in dup.detail


# --------------------------------------------------------------------------- truncation


def _layout(data: bytes):
    """Per member: (key, ext, bytes, header offset, offset of whatever follows it)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            padded = -(-m.size // 512) * 512
            out.append((key, ext, tf.extractfile(m).read(), m.offset, m.offset_data + padded))
    return out


def _expected(layout, cut: int):
    """Keys a reader must report for a tar cut at `cut`, and which of them are complete.

    A key is reported once its first header is whole. A sample is complete once the block that
    follows its last member (the next key's header or the end-of-archive block) is whole;
    before that, the reader cannot know whether more of its members were coming.
    """
    groups: list[list] = []
    for member in layout:
        if not groups or groups[-1][0][0] != member[0]:
            groups.append([])
        groups[-1].append(member)
    started = [g[0][0] for g in groups if g[0][3] + 512 <= cut]
    complete = {g[0][0] for g in groups if g[-1][4] + 512 <= cut}
    return started, complete, {(k, e): d for k, e, d, _, _ in layout}


def _check_cut(tmp_path, data: bytes, cut: int):
    layout = _layout(data)
    path = tmp_path / "00000.tar"
    path.write_bytes(data[:cut])
    samples = list(read_shard(str(path)))  # must not raise

    started, complete, original = _expected(layout, cut)
    assert [s.key for s in samples] == started, cut
    for i, s in enumerate(samples):
        if s.key in complete:
            assert s.failure is None, (cut, s)
            assert s.members == {e: d for (k, e), d in original.items() if k == s.key}
        else:
            # Only the sample being read at the break can be incomplete.
            assert i == len(samples) - 1, cut
            assert s.failure == Reason.TRUNCATED_TAR and s.detail, (cut, s)
            for ext, payload in s.members.items():
                assert original[(s.key, ext)] == payload
    return samples


def test_truncation_sweep_never_raises_and_reports_each_started_key_once(tmp_path):
    data = tar_bytes(sample_members(4))
    for cut in range(512, len(data) + 1, 37):
        _check_cut(tmp_path, data, cut)


def test_index_mode_gives_every_cut_the_same_verdicts_and_spans_hold_the_bytes(tmp_path):
    """read_shard(load=...) (training's index of a local tar) leaves unread members in the file:
    at every cut it yields the same keys and failures as reading everything, and the span of each
    member of a sample it does not fail reads back exactly that member's bytes."""
    data = tar_bytes(sample_members(4) + [("00000.jpg", b"again")])  # and a later copy of a key
    for cut in [*range(512, len(data), 41), len(data)]:
        path = write_bytes(tmp_path / "x.tar", data[:cut])
        full = list(read_shard(path))
        indexed = list(read_shard(path, load=lambda ext: ext == "txt"))
        verdicts = [(s.key, s.occurrence, s.failure) for s in full]
        assert [(s.key, s.occurrence, s.failure) for s in indexed] == verdicts, cut
        for whole, index in zip(full, indexed):
            assert index.members == {e: d for e, d in whole.members.items() if e == "txt"}, cut
            if whole.failure is None:
                got = {e: data[off : off + size] for e, (off, size) in index.spans.items()}
                assert got == {e: d for e, d in whole.members.items() if e != "txt"}, cut
    assert verdicts[-1] == ("00000", 1, Reason.DUPLICATE_KEY)

    gz = write_bytes(tmp_path / "00001.tar", gzip.compress(data, mtime=0))  # offsets of what?
    assert len(list(read_shard(gz))) == 5
    with pytest.raises(ShardReadError, match="uncompressed"):
        list(read_shard(gz, load=lambda ext: ext == "txt"))


def test_truncation_at_named_offsets(tmp_path):
    data = tar_bytes(sample_members(3))
    layout = {(k, e): (h, nxt) for k, e, _, h, nxt in _layout(data)}
    h1_jpg, after_1_jpg = layout[("00001", "jpg")]

    # Cut inside the data of the first member: the first key is still reported.
    (s,) = _check_cut(tmp_path, data, 512 + 100)
    assert s.key == "00000" and s.failure == Reason.TRUNCATED_TAR and s.members == {}

    # Cut exactly between two samples (no end-of-archive block): sample 0 may have been unfinished.
    (s,) = _check_cut(tmp_path, data, h1_jpg)
    assert s.key == "00000" and s.failure == Reason.TRUNCATED_TAR
    assert s.members == {"jpg": bytes([1]) * 300, "txt": b"caption 0"}

    # Cut inside the header of sample 1.
    (s,) = _check_cut(tmp_path, data, h1_jpg + 200)
    assert s.failure == Reason.TRUNCATED_TAR

    # Cut inside sample 1's jpg data: sample 0 is complete, sample 1 reported with no members.
    first, second = _check_cut(tmp_path, data, h1_jpg + 512 + 10)
    assert first.failure is None and second.key == "00001" and second.members == {}

    # Cut inside sample 1's txt data: the jpg that was complete is kept.
    first, second = _check_cut(tmp_path, data, after_1_jpg + 512 + 3)
    assert second.failure == Reason.TRUNCATED_TAR and list(second.members) == ["jpg"]

    # Cut inside the end-of-archive area after one whole zero block: a clean end.
    end = max(nxt for _, nxt in layout.values())
    samples = _check_cut(tmp_path, data, end + 600)
    assert [s.failure for s in samples] == [None, None, None]


def test_garbled_header_mid_stream_truncates(tmp_path):
    data = bytearray(tar_bytes(sample_members(2)))
    h1 = _layout(bytes(data))[2][3]
    data[h1 : h1 + 512] = b"\xff" * 512  # bad checksum
    samples = list(read_shard(write_bytes(tmp_path / "x.tar", bytes(data))))
    assert [(s.key, s.failure) for s in samples] == [("00000", Reason.TRUNCATED_TAR)]


@pytest.mark.parametrize(
    "content",
    [b"", b"<html>not a tar</html>" * 40, tar_bytes(sample_members(1))[:100]],
    ids=["zero-bytes", "html", "cut-in-first-header"],
)
def test_unreadable_shard_raises_clearly(tmp_path, content):
    path = write_bytes(tmp_path / "bad.tar", content)
    with pytest.raises(ShardReadError, match="bad.tar"):
        list(read_shard(path))


def test_empty_but_valid_tar_yields_nothing(tmp_path):
    assert list(read_shard(write_tar(tmp_path / "e.tar", []))) == []


def test_tar_gz_reads_and_truncated_tar_gz_does_not_raise(tmp_path):
    data = gzip.compress(tar_bytes(sample_members(3)), mtime=0)
    path = write_bytes(tmp_path / "00007.tar.gz", data)
    samples = list(read_shard(path))
    assert [(s.key, s.shard, s.failure) for s in samples] == [
        ("00000", "00007", None),
        ("00001", "00007", None),
        ("00002", "00007", None),
    ]
    assert samples[2].members["txt"] == b"caption 2"

    write_bytes(tmp_path / "00007.tar.gz", data[: len(data) // 2])
    cut = list(read_shard(path))
    assert cut and cut[-1].failure == Reason.TRUNCATED_TAR
    assert all(s.failure is None for s in cut[:-1])


# --------------------------------------------------------------------------- sidecars


def test_sidecar_rows_are_attached_by_key(tmp_path):
    path = write_tar(
        tmp_path / "00003.tar",
        [("k0.jpg", b"i"), ("k1.jpg", b"i"), ("k1.json", json.dumps({"url": "json-url"}).encode())],
    )
    table = pa.table(
        {
            "key": ["k1", "other"],
            "url": ["http://x/1.jpg", "http://x/9.jpg"],
            "caption": ["from parquet", None],
            "status": ["success", "success"],
        }
    )
    pq.write_table(table, tmp_path / "00003.parquet")
    s0, s1 = read_shard(path)
    assert s0.sidecar is None and s1.sidecar["caption"] == "from parquet"
    assert url_of(s1) == "http://x/1.jpg"
    assert url_of(s0) is None
    assert text_of(s1) == ("from parquet", None)


def test_unreadable_sidecar_warns_and_is_ignored(tmp_path, caplog):
    path = write_tar(tmp_path / "00004.tar", [("k.jpg", b"i"), ("k.txt", b"t")])
    (tmp_path / "00004.parquet").write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="capfilt.io.shards"):
        (s,) = read_shard(path)
    assert s.sidecar is None and s.members["txt"] == b"t"
    assert "00004.parquet" in caplog.text


def test_url_of_json_member():
    assert url_of(sample({"json": b'{"url": "http://a/b.jpg"}'})) == "http://a/b.jpg"
    assert url_of(sample({"json": b"{not json"})) is None
    assert url_of(sample({"json": b"[1, 2]"})) is None


# --------------------------------------------------------------------------- text_of


@pytest.mark.parametrize(
    "members, sidecar, expected",
    [
        ({"txt": b"  a dog on a beach \n"}, None, ("a dog on a beach", None)),
        ({"txt": "\ufeffcaf\u00e9".encode()}, None, ("caf\u00e9", None)),
        ({}, None, (None, Reason.WEB_TEXT_MISSING)),
        ({}, {"caption": None}, (None, Reason.WEB_TEXT_MISSING)),
        ({"txt": b""}, None, (None, Reason.WEB_TEXT_EMPTY)),
        ({"txt": " \t\n\u3000".encode()}, None, (None, Reason.WEB_TEXT_EMPTY)),
        ({"txt": b"\xff\xfecaption"}, None, (None, Reason.WEB_TEXT_NOT_UTF8)),
        ({"txt": b"x" * 17}, None, (None, Reason.WEB_TEXT_TOO_LONG)),
        ({"txt": b"x" * 16}, None, ("x" * 16, None)),
        ({}, {"caption": "  sidecar text "}, ("sidecar text", None)),
        ({"txt": b"member wins"}, {"caption": "sidecar"}, ("member wins", None)),
        ({}, {"caption": "   "}, (None, Reason.WEB_TEXT_EMPTY)),
    ],
)
def test_text_of(members, sidecar, expected):
    assert text_of(sample(members, sidecar), max_bytes=16) == expected


def test_text_of_default_limit():
    from capfilt.config import MAX_TEXT_BYTES, DecodeConfig

    assert DecodeConfig().max_text_bytes == MAX_TEXT_BYTES  # one default, declared once
    assert text_of(sample({"txt": b"y" * MAX_TEXT_BYTES}))[1] is None
    assert text_of(sample({"txt": b"y" * (MAX_TEXT_BYTES + 1)})) == (None, Reason.WEB_TEXT_TOO_LONG)


# --------------------------------------------------------------------------- fsspec URLs


@pytest.fixture
def memory_dir():
    fs = fsspec.filesystem("memory")
    root = "/capfilt-test-shards"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_glob_read_and_sidecar(memory_dir):
    for i in (1, 0):
        with fsspec.open(f"{memory_dir}/{i:05d}.tar", "wb") as f:
            f.write(tar_bytes(sample_members(2)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["00001"], "url": ["http://m/1"]}), buf)
    with fsspec.open(f"{memory_dir}/00000.parquet", "wb") as f:
        f.write(buf.getvalue())

    shards = expand_shards(f"{memory_dir}/*.tar")
    assert [shard_id(u) for u in shards] == ["00000", "00001"]
    samples = list(read_shard(shards[0]))
    assert [s.key for s in samples] == ["00000", "00001"]
    assert url_of(samples[1]) == "http://m/1" and samples[0].sidecar is None

    # A non-glob URL comes back exactly as given; a missing one names itself.
    assert expand_shards(f"{memory_dir}/00001.tar") == [f"{memory_dir}/00001.tar"]
    with pytest.raises(FileNotFoundError, match="00009"):
        expand_shards(f"{memory_dir}/00009.tar")
