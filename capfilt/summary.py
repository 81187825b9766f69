"""The end-of-run summary a person reads."""

from __future__ import annotations

from capfilt.config import SOURCES


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:5.1f}%" if total else "    -"


def format_summary(
    summary: dict, seconds: float | None = None, stage_seconds: dict | None = None, processed: int | None = None
) -> str:
    """``processed``: the samples this run did (a resumed run skips done shards); the rate is of those."""
    n = summary["input"]
    lines = [
        "",
        f"capfilt run: {summary['shards_done']}/{summary['shards']} shards complete -> {summary['output']}",
        f"  input     {n:8d}",
        f"  kept      {summary['kept']:8d}  {_pct(summary['kept'], n)}",
        f"  rejected  {summary['rejected']:8d}  {_pct(summary['rejected'], n)}   (no text of the image kept)",
        f"  failed    {summary['failed']:8d}  {_pct(summary['failed'], n)}",
    ]
    balance = summary["kept"] + summary["rejected"] + summary["failed"]
    lines.append(
        f"  accounting: input {n} = kept + rejected + failed = {balance}" + ("  OK" if balance == n else "  MISMATCH")
    )
    if summary.get("upstream_failed"):
        lines.append(
            f"  upstream  {summary['upstream_failed']:8d}           (img2dataset attempted, not in the input "
            f"shards: input + upstream = {n + summary['upstream_failed']})"
        )
        for reason, count in sorted(summary.get("upstream_failed_by_reason", {}).items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"    {reason[:60]:60s} {count:6d}")
    if summary.get("partial"):
        missing = summary.get("missing_source_shards", [])
        more = f", ... ({len(missing) - 5} more)" if len(missing) > 5 else ""
        lines.append(
            f"  PARTIAL: {len(missing)} shards of the source run were not finished and are not covered: "
            f"{', '.join(missing[:5])}{more}"
        )
    if summary["failed_by_reason"]:
        lines.append("  failed samples by reason:")
        for reason, count in sorted(summary["failed_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason:28s} {count:6d}")
    for source in SOURCES:
        c = summary["candidates"][source]
        total = c["kept"] + c["rejected"]
        if not total:
            continue
        lines.append(f"  {source} texts: {c['kept']} kept / {total} ({_pct(c['kept'], total).strip()})")
        for reason, count in sorted(
            summary["candidate_rejections_by_reason"].get(source, {}).items(), key=lambda kv: -kv[1]
        ):
            lines.append(f"    rejected {reason:26s} {count:6d}")
    for shard, err in summary.get("shard_errors", {}).items():
        lines.append(f"  SHARD FAILED {shard}: {err}")
    if seconds is not None:
        done = n if processed is None else processed
        rate = done / seconds if seconds > 0 else 0.0
        skipped = (
            "" if processed is None or processed == n else f" ({n - processed} samples of shards already complete)"
        )
        lines.append(
            f"  time {seconds:.1f}s"
            + (f", {rate:.1f} samples/s over {done} samples{skipped}" if done else f", no sample to do{skipped}")
        )
    if stage_seconds:
        lines.append("  time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in stage_seconds.items()))
    out = summary["output"]
    # The listing summary.json carries (RunDir.summary: the LAION table in laion_coco mode), with
    # the notes a reader needs; a summary from before that listing gets the fixed one.
    notes = {"ledger": "   (one row per candidate text)", "shard sizes": "   (samples per tar, for open_clip)"}
    from capfilt.io.names import RUN_FILE, SUMMARY_FILE, shard_file

    listed = summary.get("outputs") or {
        "cleaned shards": shard_file("shards", "*"),
        "ledger": shard_file("ledger", "*"),
        "stats": shard_file("stats", "*"),
    }
    lines.append("  outputs:")
    for what, glob in listed.items():
        lines.append(f"    {what:15s} {out}/{glob}{notes.get(what, '')}")
    lines += [f"    {'summary':15s} {out}/{SUMMARY_FILE}", f"    {'run record':15s} {out}/{RUN_FILE}"]
    return "\n".join(lines)
