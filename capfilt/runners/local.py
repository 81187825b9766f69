"""The local runner: every stage in this process, shard after shard, batch after batch."""

from __future__ import annotations

import logging
from itertools import islice

from capfilt.io.output import shard_writer
from capfilt.io.shards import read_shard, shard_id
from capfilt.progress import progress_bar
from capfilt.stages import StageError, build_stages, run_stages
from capfilt.stages.rows import ROW_COLUMNS, raw_to_row

log = logging.getLogger("capfilt")


def row_batches(url: str, config, batch_size: int):
    """Column batches of pipeline rows read from one shard."""
    rows = (raw_to_row(s, config.seed, config.decode.max_text_bytes) for s in read_shard(url))
    while chunk := list(islice(rows, batch_size)):
        yield {c: [r[c] for r in chunk] for c in ROW_COLUMNS}


def run_local(config, urls: list[str], run_dir, progress: bool = True) -> tuple[dict, dict]:
    stages = build_stages(config)
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    with progress_bar(len(urls), progress) as bar:
        for url in urls:
            shard = shard_id(url)
            writer = None
            try:
                writer = shard_writer(run_dir.path, shard, laion=config.decide.mode == "laion_coco", source=url)
                for batch in row_batches(url, config, config.batch_size):
                    batch = run_stages(stages, batch, seconds)
                    writer.add(batch)  # streamed out: the batch and its decoded pixels are dropped here
                    bar.advance(len(batch["key"]))
                bar.shard_done(writer.commit())
            except Exception as err:  # noqa: BLE001 - a shard that cannot be read is reported, the job goes on
                if writer is not None:
                    writer.abort()
                errors[shard] = str(err) if isinstance(err, StageError) else f"{type(err).__name__}: {err}"
                log.error("shard %s failed: %s", shard, errors[shard])
                bar.shard_failed()
    return errors, dict(seconds)
