"""The run's progress bar: a total over all samples (estimated until the last shard), running
totals over the whole run, and log records printed above the bar rather than into it."""

import io
import logging

from capfilt.progress import Progress, progress_bar


def test_total_is_estimated_from_finished_shards_and_exact_at_the_end():
    out = io.StringIO()
    bar = Progress(shards=4, file=out)
    bar.advance(10)
    assert bar.bar.total is None
    bar.shard_done({"input": 10, "kept": 6, "rejected": 3, "failed": 1})
    assert bar.bar.total == 40  # 10 per shard so far x 4 shards
    assert "~estimated" in bar.bar.postfix and "kept 6" in bar.bar.postfix
    for n in (20, 20, 10):
        bar.advance(n)
        bar.shard_done({"input": n, "kept": n, "rejected": 0, "failed": 0})
    assert (bar.bar.n, bar.bar.total) == (60, 60)
    assert bar.bar.postfix == "shards 4/4, kept 56, rejected 3, failed 1"  # running totals, exact
    bar.close()


def test_a_failed_shard_counts_as_done_without_samples():
    bar = Progress(shards=2, enabled=False)
    bar.shard_failed()
    bar.shard_done({"input": 5, "kept": 5, "rejected": 0, "failed": 0})
    assert bar.done_shards == 2 and bar.totals["kept"] == 5


def test_log_records_go_above_the_bar(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()  # stderr, as the CLI's basicConfig sets up
    root.addHandler(handler)
    try:
        with progress_bar(2) as bar:
            bar.advance(3)
            logging.getLogger("capfilt").warning("a warning for the user")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("a warning for the user") == 1  # printed once, by the bar-aware handler
    lines = err.replace("\r", "\n").split("\n")
    assert "a warning for the user" in lines  # a line of its own, not inside the bar's line


def test_a_resumed_run_reports_the_rate_of_the_samples_it_did():
    from capfilt.records import empty_stats
    from capfilt.summary import format_summary

    summary = {**empty_stats("*"), "input": 1000, "kept": 1000, "shards": 10, "shards_done": 10, "output": "out"}
    assert "100.0 samples/s over 100 samples (900 samples of shards already complete)" in format_summary(
        summary, seconds=1.0, processed=100
    )
    assert "no sample to do (1000 samples" in format_summary(summary, seconds=1.0, processed=0)


def test_a_run_with_nothing_left_to_do_shows_no_bar(capsys):
    """Issue 22 item 11: a rerun whose shards are all complete printed an empty `0/?` bar."""
    with progress_bar(0, enabled=True):
        pass
    out = io.StringIO()
    Progress(shards=0, file=out).close()
    assert out.getvalue() == "" and capsys.readouterr().err == ""
    out = io.StringIO()
    Progress(shards=1, file=out).close()
    assert "capfilt" in out.getvalue()  # a run with work still shows one
