"""The HTML report: header (models, thresholds, config), example cards by category, failures as
one-liners, matplotlib histograms, the rounds table of a loop; self-contained, deterministic, and
laid out as intended in a real browser (headless Chromium)."""

import html
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from thresholds import split_thresholds

from capfilt.config import load_config
from capfilt.pipeline import run
from capfilt.report import CATEGORIES, build_report, parse_show
from capfilt.report.charts import score_histogram_svg
from capfilt.synthetic import main_synth
from capfilt.synthetic.truth import labelled_ledger, quality

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def small_run(root, tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    main_synth(base / "data", shards=1, per_shard=16, broken=True, seed=2)
    config = load_config(root / "pipelines/demo/tiny.yaml", split_thresholds())
    config = config.model_copy(update={"input": [str(base / "data" / "*.tar")], "output": str(base / "run")})
    assert run(config, progress=False).ok
    return base / "run"


@pytest.fixture(scope="module")
def ledger(small_run):
    return pq.read_table(sorted((small_run / "ledger").glob("*.parquet"))).to_pylist()


@pytest.fixture(scope="module")
def small_loop(small_run, tmp_path_factory):
    """A loop directory as `capfilt loop` leaves it: state.json written by the loop's own State,
    round-1/capfilt-captioner_filter a real CapFilt run. (A real tiny loop trains for minutes:
    tests/test_loop.py runs one, slow, and reports on it.)"""
    from capfilt.loop import State

    loop = tmp_path_factory.mktemp("loop")
    shutil.copytree(small_run, loop / "round-1" / "capfilt-captioner_filter")
    state = State(loop)
    state.save_round(
        {
            "round": 0,
            "ablation": "-",
            "trained_on": "web (noisy)",
            "r1": 7.2,
            "txt_r1": 6.0,
            "img_r1": 8.4,
            "itc_r1": 5.8,
            "bleu4": 0.2185,
            "cider": 1.3635,
        }
    )
    state.save_round(
        {
            "round": 1,
            "ablation": "captioner_filter",
            "calibration_score": "itc",
            "calibration": {
                "web": {"threshold": 0.8787, "precision": 0.9, "recall": 0.9, "f": 0.9},
                "synthetic": {"threshold": 0.99, "precision": 0.8, "recall": 0.7, "f": 0.8},
            },
            "capfilt_input": 44,
            "capfilt_kept": 27,
            "quality": {"web": {"noise_before": 0.4}, "bootstrapped_noise": 0.197},
            "bootstrapped_noise": 0.197,
            "med": str(loop / "round-1" / "pretrain-captioner_filter" / "med"),
            "trained_on": "bootstrapped (captioner_filter) + clean",
            "r1": 21.0,
            "txt_r1": 26.7,
            "img_r1": 15.3,
            "itc_r1": 31.3,
            "bleu4": 0.335,
            "cider": 2.215,
        }
    )
    return loop


def _section(page: str, category: str) -> str:
    """The HTML of one example category, up to the next heading."""
    start = page.index(f'<h3 id="ex-{category}">')
    end = min(i for i in (page.find("<h3", start + 1), page.find("<h2", start + 1), page.find("</main>")) if i > 0)
    return page[start:end]


def _card_keys(section: str) -> list[str]:
    return [html.unescape(k) for k in re.findall(r'<div class="foot">[^/<]+/([^ <]+)', section)]


def test_header_names_models_thresholds_config_and_date(small_run):
    page = build_report(small_run, small_run / "r.html").read_text()
    meta = json.loads((small_run / "run.json").read_text())
    for role, identity in meta["models"].items():
        assert f'<td class="nowrap">{role}</td>' in page
        assert identity["preset"] in page and f"sha256: {identity['sha256']}" in page
    decide = meta["config"]["decide"]
    assert f"{decide['web']['itm']:.5f}" in page and f"{decide['synthetic']['itm']:.5f}" in page
    assert "resolved config (run.json)" in page and "top_p: 0.9" in page  # the whole config, as YAML
    assert meta["started"] in page and "torch " + meta["versions"]["torch"] in page
    assert re.search(r"report written \d{4}-\d\d-\d\dT", page)  # the one line that changes between builds


def test_default_view_is_the_papers_figure(small_run, ledger):
    """Web text rejected by the filter, a synthetic caption kept: every such sample, each card with
    its image, its web text in red with the score and the threshold that rejected it, and the kept
    caption in green."""
    expected = set()
    for key in {r["key"] for r in ledger}:
        rows = [r for r in ledger if r["key"] == key and r["occurrence"] == 0]
        web = [r for r in rows if r["source"] == "web"]
        if (
            web
            and web[0]["reason"] == "itm_below_threshold"
            and any(r["kept"] for r in rows if r["source"] == "synthetic")
        ):
            expected.add(key)
    assert expected, "the tiny run has no web-rejected-synthetic-kept sample to show"
    page = build_report(small_run, small_run / "r.html", n_samples=50, date=False).read_text()
    section = _section(page, "web-rejected-synthetic-kept")
    assert set(_card_keys(section)) == expected
    assert section.count('<img src="data:image/jpeg;base64,') == len(expected)
    threshold = json.loads((small_run / "run.json").read_text())["config"]["decide"]["web"]["itm"]
    assert re.search(rf"rejected: ITM 0\.\d{{5}} &lt; {threshold:.5f} \(itm_below_threshold\)", section)
    assert section.count('class="t kept') >= len(expected) and "selected (the sample&#39;s caption)" in section
    assert '<span class="src web">web</span>' in section and '<span class="src synthetic">synthetic</span>' in section
    assert "failed" not in _card_keys(section) and '<h3 id="ex-borderline">' not in page


def test_categories_from_the_cli(small_run, ledger, capsys):
    from capfilt.cli import main

    out = small_run / "cats.html"
    assert (
        main(
            [
                "report",
                str(small_run),
                "--out",
                str(out),
                "--show",
                "failed,borderline",
                "--show",
                "random",
                "--examples",
                "3",
                "--no-date",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert [m for m in re.findall(r'<h3 id="ex-([a-z-]+)">', page)] == ["failed", "borderline", "random"]
    # Failures: one line each (key, reason, detail), the first lines covering distinct reasons.
    failed = _section(page, "failed")
    lines = re.findall(
        r'<div class="fail" title="[^"]*"><code>([^<]+)</code><span class="reason">([^<]+)</span>'
        r'<span class="detail">([^<]*)</span></div>',
        failed,
    )
    n_failed = sum(r["candidate"] == -1 for r in ledger)
    assert f"3 of {n_failed} samples" in failed and len(lines) == 3
    assert len({reason for _, reason, _ in lines}) == 3 and all(detail for _, _, detail in lines)
    assert "<img" not in failed
    # Borderline: the first card holds the text nearest its threshold.
    decide = json.loads((small_run / "run.json").read_text())["config"]["decide"]
    nearest = min(
        (r for r in ledger if r["itm"] is not None and r["source"]),
        key=lambda r: (abs(r["itm"] - decide[r["source"]]["itm"]), r["shard"], r["key"]),
    )
    assert _card_keys(_section(page, "borderline"))[0] == nearest["key"]
    assert "3 of 44 samples" in _section(page, "random")


def test_every_category_selects_what_it_names(small_run, ledger):
    from capfilt.report import Run, select

    run = Run(small_run)
    samples = {}
    for r in ledger:
        samples.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
    web = {i: next((r for r in rows if r["source"] == "web"), None) for i, rows in samples.items()}
    expected = {
        "web-rejected-synthetic-kept": {
            i
            for i, rows in samples.items()
            if web[i]
            and not web[i]["kept"]
            and web[i]["reason"] == "itm_below_threshold"
            and any(r["kept"] for r in rows if r["source"] == "synthetic")
        },
        "web-kept": {i for i in samples if web[i] and web[i]["kept"]},
        "synthetic-selected": {
            i for i, rows in samples.items() if any(r["selected"] and r["source"] == "synthetic" for r in rows)
        },
        "borderline": {i for i, rows in samples.items() if any(r["itm"] is not None for r in rows)},
        "rejected": {i for i, rows in samples.items() if rows[0]["sample_status"] == "rejected"},
        "failed": {i for i, rows in samples.items() if rows[0]["sample_status"] == "failed"},
        "random": set(samples),
    }
    assert set(expected) == set(CATEGORIES)
    for category, want in expected.items():
        chosen, total = select(run, category, 1000, seed=0)
        assert set(chosen) == want and total == len(want), category
        assert select(run, category, 3, seed=0) == (chosen[:3], total)  # the first n of one fixed order
    kept_web = select(run, "web-kept", 1000, 0)[0]
    margins = [web[i]["itm"] for i in kept_web]
    assert margins == sorted(margins, reverse=True)  # furthest above the threshold first
    assert select(run, "random", 5, seed=1) != select(run, "random", 5, seed=2)


def test_an_unknown_category_is_a_one_line_error(small_run, capsys):
    from capfilt.cli import main

    assert main(["report", str(small_run), "--show", "web-kept,everything", "--out", str(small_run / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'everything'" in err and all(c in err for c in CATEGORIES)
    assert not (small_run / "x.html").exists()
    assert parse_show(["random,failed", "random"]) == ["random", "failed"]
    assert parse_show(None) == ["web-rejected-synthetic-kept"]


def test_histograms_label_both_sources_and_draw_the_threshold():
    by_source = {
        "web": {"kept": [0.62, 0.7, 0.71], "rejected": [0.1, 0.2]},
        "synthetic": {"kept": [0.9], "rejected": [0.3, 0.35, 0.4, 0.45]},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated matplotlib call
        svg = score_histogram_svg("itm", by_source, {"web": 0.55, "synthetic": None})
    assert svg.startswith("<svg") and svg == score_histogram_svg("itm", by_source, {"web": 0.55, "synthetic": None})
    for label in (
        "ITM: web texts (5 scored)",  # each panel names its score: the pair reads on its own
        "ITM: synthetic captions (5 scored)",
        "kept (3)",
        "rejected (2)",
        "kept (1)",
        "rejected (4)",
        "threshold 0.550",
        "ITM score",
        "texts",
    ):
        assert f">{label}</text>" in svg, label
    assert svg.count("threshold ") == 1  # only the web panel has a threshold
    assert "<metadata>" not in svg and "<script" not in svg
    # One source without a value: one panel.
    assert "synthetic captions" not in score_histogram_svg("clip", {"web": {"kept": [0.1], "rejected": []}}, {})
    assert score_histogram_svg("clip", {"web": {"kept": [], "rejected": []}}, {}) == ""


def test_report_is_one_deterministic_self_contained_file(small_run):
    first = build_report(small_run, small_run / "a.html", date=False, show=["random", "failed"]).read_bytes()
    again = build_report(small_run, small_run / "b.html", date=False, show=["random", "failed"]).read_bytes()
    assert first == again
    page = first.decode()
    assert "report written" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # images are data: URIs, links are in-page anchors
    assert not re.search(r"url\((?!#)", page)
    assert page.count('<figure class="hist"') == 3  # ITM, ITC, CLIP, each an inline matplotlib SVG


def test_a_local_url_reports_like_the_path_it_names(small_run, small_loop, tmp_path):
    """file:// and local:// name this machine's paths (io.folder.is_local): a loop output, which
    only a local folder can hold, reports from them as from the plain path."""
    for url in (f"file://{small_loop}", f"local://{small_loop}"):
        page = build_report(url, tmp_path / "loop.html", date=False).read_text()
        assert page == build_report(small_loop, tmp_path / "plain.html", date=False).read_text()
        assert '<table class="rounds">' in page
    page = build_report(f"file://{small_run}", tmp_path / "run.html", date=False).read_text()
    assert page == build_report(small_run, tmp_path / "plain-run.html", date=False).read_text()


def test_rounds_table_of_a_loop(small_loop):
    page = build_report(small_loop, date=False).read_text()
    table = page[page.index('<table class="rounds">') :]
    table = table[: table.index("</table>")]
    head = [html.unescape(h) for h in re.findall(r"<th>([^<]*)</th>", table)]
    assert head[:4] == ["round", "ablation", "trained on", "R@1"]
    assert head == [
        "round",
        "ablation",
        "trained on",
        "R@1",
        "text / image R@1",
        "ITC R@1",
        "BLEU\u20114",
        "CIDEr",
        "kept by CapFilt",
        "threshold",
        "noise: web → kept",
        "MED (in round-N/)",
    ]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert [re.search(r"<td[^>]*>(\d+)</td>", r).group(1) for r in rows] == ["0", "1"]
    assert '21.0<br><span class="up">+13.8</span>' in rows[1]  # gain over round 0
    assert '2.215<br><span class="up">+0.851</span>' in rows[1]
    assert "27 / 44" in rows[1] and "ITC web ≥ 0.879" in rows[1] and "40.0% → 19.7%" in rows[1]
    med = str(small_loop / "round-1" / "pretrain-captioner_filter" / "med")
    assert f'<code title="{med}">pretrain-captioner_filter/med</code>' in rows[1]
    # The CapFilt run of the last round follows, with its own header and the paper's figure.
    assert "CapFilt run round-1/capfilt-captioner_filter" in page and '<h3 id="ex-web-rejected-synthetic-kept">' in page


def test_ground_truth_quality_of_a_run(small_run):
    rows = labelled_ledger(small_run)
    q = quality(rows)
    assert q["web"]["texts"] > 0 and 0 <= q["web"]["noise_before"] <= 1
    # Random-weight captioners do not write true captions.
    assert q["synthetic"]["precision"] in (0.0, None)


def test_calibrate_cli_chooses_the_score_from_labels(small_run, capsys):
    from capfilt.cli import main

    assert main(["calibrate", str(small_run), "--score", "auto"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.split("# paste")[0])
    assert result["score"] in ("itm", "itc", "clip") and 0 <= result["web"]["precision"] <= 1
    assert f"web: {{{result['score']}: {result['web']['threshold']:.4f}}}" in printed


# ---------------------------------------------------------------------------------------- a real browser

# Appended to a copy of the report: measures the laid-out page and leaves the numbers in the DOM,
# which `chromium --dump-dom` prints. Text positions are taken from the line boxes (Range client
# rects), so a caption that starts beside the image and wraps under it is caught.
LAYOUT_PROBE = """<script>
const box = e => e.getBoundingClientRect();
const lines = e => { const r = document.createRange(); r.selectNodeContents(e); return [...r.getClientRects()]; };
const main = box(document.querySelector('main'));
const out = {scrollWidth: document.documentElement.scrollWidth, main: [main.left, main.right], cards: [],
             fails: [...document.querySelectorAll('.fail')].map(f => box(f).height),
             svgs: [...document.querySelectorAll('figure.hist svg')]
                   .map(s => [box(s).left, box(s).right, box(s).height]),
             tables: [...document.querySelectorAll('table')].map(t => box(t).right),
             med: [...document.querySelectorAll('table.rounds td code')].map(c => box(c).height)};
for (const c of document.querySelectorAll('.card')) {
  const thumb = box(c.querySelector('.thumb')), img = c.querySelector('.thumb img');
  const texts = [...c.querySelectorAll('.t')].flatMap(t => lines(t)).filter(r => r.width > 0);
  out.cards.push({thumb: [thumb.left, thumb.right, thumb.top, thumb.bottom], img: img ? box(img).width : 0,
                  textLeft: Math.min(...texts.map(r => r.left)), textRight: Math.max(...texts.map(r => r.right)),
                  card: [box(c).left, box(c).right]});
}
const pre = document.createElement('pre'); pre.id = 'layout'; pre.hidden = true;
pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
</script>"""


def _chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1280,2000",
            *args,
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _layout(tmp_path: Path, page: Path) -> dict:
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    dom = _chromium(tmp_path, probe, "--dump-dom").stdout
    return json.loads(html.unescape(re.search(r'<pre id="layout" hidden="">(.*?)</pre>', dom, re.S).group(1)))


@pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason="Chromium is not installed: `make browser` installs it (apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(small_run, small_loop, tmp_path):
    import numpy as np
    from PIL import Image

    page = build_report(
        small_run, tmp_path / "report.html", date=False, show=["web-rejected-synthetic-kept", "random", "failed"]
    )
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page, f"--screenshot={shot}")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2000, 1280, 3)
    assert img.std() > 20  # not blank: text, tables, charts, thumbnails
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert (0xE3, 0xF5, 0xE5) in colours and (0xFD, 0xE6, 0xE6) in colours  # kept and rejected text backgrounds

    layout = _layout(tmp_path, page)
    assert layout["scrollWidth"] <= 1280  # nothing sticks out sideways
    assert len(layout["cards"]) >= 6
    for card in layout["cards"]:
        left, right, top, bottom = card["thumb"]
        assert right - left == 128 and bottom - top == 128 and card["img"] == 128  # fixed image column
        assert card["textLeft"] >= right + 8  # every line of every text beside the image, none under it
        assert card["textRight"] <= card["card"][1]
    assert layout["fails"] and all(h < 26 for h in layout["fails"])  # failures: one line each
    assert len(layout["svgs"]) == 3 and all(right <= layout["main"][1] and h > 150 for _, right, h in layout["svgs"])

    loop = _layout(tmp_path, build_report(small_loop, tmp_path / "loop.html", date=False))
    assert loop["scrollWidth"] <= 1280 and all(right <= loop["main"][1] for right in loop["tables"])
    assert loop["med"] and all(h < 20 for h in loop["med"])  # the MED path stays on one line


def test_laion_mode_report_shows_the_caption_that_replaced_the_web_text(root, tmp_path):
    """Issue 22 item 5: in decide.mode laion_coco no filter rejects the web text, so the BLIP
    figure (web rejected, synthetic kept) is empty; the default shows the selected captions."""
    main_synth(tmp_path / "data", shards=1, per_shard=4, seed=5)
    config = load_config(root / "pipelines/demo/laion_coco_tiny.yaml", ["captioner.force_eos_prob=0.99"])
    config = config.model_copy(update={"input": [str(tmp_path / "data" / "00000.tar")], "output": str(tmp_path / "r")})
    assert run(config, progress=False).ok
    page = build_report(tmp_path / "r", date=False).read_text()
    assert "max_new_tokens 12, prompt" in page and "force_eos_prob 0.99" in page  # every decoding setting it set
    shown = re.search(r'<h3 id="ex-synthetic-selected">synthetic-selected: (\d+) of (\d+) samples', page)
    assert shown and int(shown.group(1)) > 0
    assert page.count('<div class="card ') == int(shown.group(1))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["outputs"]["laion table"] == "laion/*.parquet"


def test_score_charts_one_per_row(small_run, tmp_path):
    """Issue 22 item 11: each score's pair of panels on its own row (three figures in a two-column
    grid left CLIP's pair alone on a half-empty row)."""
    page = build_report(small_run, tmp_path / "r.html", date=False).read_text()
    css = re.search(r"\.charts\{([^}]*)\}", page).group(1)
    assert "flex-direction:column" in css and "auto-fill" not in css
    assert re.search(r">ITM: web texts \(\d+ scored\)</text>", page)


def test_every_reason_has_prose():
    """records.REASON_TEXT words every records.Reason (the report's meaning column), and nothing else."""
    from capfilt.records import REASON_TEXT, Reason

    reasons = {v for k, v in vars(Reason).items() if k.isupper()}
    assert set(REASON_TEXT) == reasons
    assert all(isinstance(REASON_TEXT[r], str) and REASON_TEXT[r].strip() for r in reasons)


def test_hostile_web_text_is_shown_as_text_never_as_markup(root, tmp_path):
    """Web texts are the crawl's, anything at all: the page shows them as text in every place a
    text appears (card, failure line, its title attribute), and no tag of theirs reaches the page."""
    import io
    import tarfile

    import markupsafe
    from PIL import Image

    hostile = ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "it's & <b>bold</b>"]
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "00000.tar", "w") as tar:
        for i, text in enumerate([*hostile, hostile[1]]):
            image = jpeg.getvalue() if i < len(hostile) else b"not a jpeg"  # the last one fails
            for suffix, data in ((".jpg", image), (".txt", text.encode())):
                info = tarfile.TarInfo(f"{i:04d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    config = load_config(root / "pipelines/demo/tiny.yaml", split_thresholds())
    shard, out = str(tmp_path / "data" / "00000.tar"), str(tmp_path / "run")
    config = config.model_copy(update={"input": [shard], "output": out})
    assert run(config, progress=False).ok
    page = build_report(tmp_path / "run", tmp_path / "r.html", n_samples=10, date=False, show=["random"]).read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>bold" not in page
    for text in hostile:
        assert str(markupsafe.escape(text)) in page  # the card's text, escaped
    assert '<div class="fail" title="00000/0003 · ' in page  # the failed one's line, its text in the title


def test_a_template_refuses_a_value_it_does_not_use_or_lacks_one_it_does():
    """A misspelt name would leave the template's own variable unset and the page quietly short."""
    import jinja2

    from capfilt.report.templates import render

    with pytest.raises(TypeError, match="uses no titel"):
        render("page.html", titel="run")
    with pytest.raises(jinja2.UndefinedError):
        render("page.html", title="run")
