"""`python -m benchmarks.decode_profile`: two capfilt trees profiled side by side, its section of
docs/benchmarks.md written without touching the rest (tiny preset, one round)."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import decode_profile

ROOT = Path(__file__).resolve().parents[1]


def test_two_sources_profiled_alternately_into_their_own_section(tmp_path):
    import torch

    given = (os.environ.get("CAPFILT_MODELS_DIR"), torch.get_num_threads())
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    args = ["--size", "tiny", "--ks", "4", "--images", "1", "--rounds", "1", "--threads", "1"]
    assert decode_profile.main([*args, "--sources", f"a={ROOT},b={ROOT}", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    section = text[text.index(decode_profile.BEGIN) : text.index(decode_profile.END)]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| 4 | 1 |")]
    assert [r[2] for r in rows] == ["a", "b"]
    header = next(line for line in section.splitlines() if line.startswith("| K |")).split(" | ")
    for row in rows:
        cells = dict(zip(header, row))
        # the decoder's own matmuls and the LM head are told apart, and each took time
        assert float(cells["matmul"].split()[0]) > 0 and float(cells["LM head"].split()[0]) > 0
    assert rows[0][-1] == rows[1][-1]  # the same tree samples the same ids
    assert (os.environ.get("CAPFILT_MODELS_DIR"), torch.get_num_threads()) == given  # given back
