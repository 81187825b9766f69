"""`capfilt dedup --runner ray`: one Ray task per shard of the run (`dedup.block_duplicates`).

Each task reads its shard's embeddings and those of the shards before it straight from the run's
location (a shared file system or an object store: a remote file is copied once per worker
process), and returns only its duplicates' rows; the driver concatenates them in run order, so
the table is the local loop's, row for row.
"""

from __future__ import annotations

import ray

from capfilt.runners.ray.cluster import ray_session


@ray.remote(max_retries=3)
def _block(blocks, b: int, threshold: float) -> list[dict]:
    from capfilt.dedup import block_duplicates

    return block_duplicates(blocks, b, threshold)


def find_duplicates_on_ray(blocks: list, threshold: float, address: str | None = None) -> list[dict]:
    """`dedup.find_duplicates` with one Ray task per block; joins ``address`` or starts a local Ray."""
    from capfilt.config import parse_config

    config = parse_config({"decide": {"web": {}, "synthetic": {}}, "ray": {"address": address} if address else {}})
    with ray_session(config):
        shared = ray.put(blocks)  # the plan (paths, kept rows, keys) once, not once per task
        futures = [_block.remote(shared, b, threshold) for b in range(len(blocks))]
        return [row for rows in ray.get(futures) for row in rows]
