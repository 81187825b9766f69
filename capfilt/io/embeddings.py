"""A shard's embeddings files, in clip-retrieval's layout (its `clip_inference` writer):

    embeddings/img_emb/{shard}.npy         float16, (rows, dim), L2-normalised image embeddings
    embeddings/text_emb/{shard}.npy        the same rows' caption embeddings (``image_text`` only)
    embeddings/metadata/{shard}.parquet    row r describes row r: key, caption, url, shard, model

`clip-retrieval index --embeddings_folder OUTPUT/embeddings` (autofaiss over img_emb/ and text_emb/,
metadata/ copied beside the index) and `embedding_reader` read them as they are: every reader
takes the .npy files in name order, and the metadata files sort the same way.

A row is every sample the run scored (kept or rejected: `capfilt dedup` and a rethreshold that
loosens a cut need them), in shard order; a failed sample has none. Its caption is the text whose
embedding text_emb holds: the selected text, else the web text, else the first text the embedding
model scored; a sample none of whose texts was scored has caption null and (image_text) a
zero text row. The files are written by the `ShardWriter` with the shard, before its marker.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.folder import OutputFolder
from capfilt.io.names import EMBEDDINGS, shard_file

KINDS = dict(zip(("img_emb", "text_emb", "metadata"), EMBEDDINGS))  # writer's key -> its folder
METADATA_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("model", pa.string()),  # the embedding model's identity (run.json's), as JSON
        pa.field("pixel_hash", pa.string()),  # `pixel_hash` of the decoded image: exact duplicates (capfilt dedup)
    ]
)


def _caption(batch: dict, i: int):
    """(candidate index, text) of the row's caption (see the module doc), or (None, None)."""
    from capfilt.records import row_candidates

    cands = row_candidates(batch, i)
    feats = (batch.get("text_embeddings") or [None] * len(batch["key"]))[i]
    has = [j for j in range(len(cands)) if feats is not None and j < len(feats) and feats[j] is not None]
    if feats is None:  # image embeddings only: any scored text is the caption
        has = [j for j, c in enumerate(cands) if c.get("clip") is not None or c.get("clip_scores")]
    selected = batch["selected"][i] if "selected" in batch else -1
    for j in (selected, 0):
        if j is not None and j >= 0 and j in has:
            return j, cands[j]["text"]
    return (has[0], cands[has[0]]["text"]) if has else (None, None)


def embedding_rows(batch: dict) -> dict | None:
    """One batch's embeddings rows (None when the run writes none): metadata rows, the image
    matrix and, for ``image_text``, the text matrix, both float16."""
    if "image_embedding" not in batch:
        return None
    texts = batch.get("text_embeddings")
    with_text = texts is not None and any(t is not None for t in texts)
    meta, images, text_rows = [], [], []
    for i, emb in enumerate(batch["image_embedding"]):
        if batch["failure"][i] or emb is None:
            continue
        j, caption = _caption(batch, i)
        meta.append(
            {
                "key": batch["key"][i],
                "caption": caption,
                "url": batch["url"][i],
                "shard": batch["shard"][i],
                "model": batch["embedding_model"][i],
                "pixel_hash": batch["pixel_hash"][i] if "pixel_hash" in batch else None,
            }
        )
        images.append(np.asarray(emb, dtype=np.float32))
        if with_text:
            vec = texts[i][j] if j is not None and texts[i] is not None else None
            text_rows.append(np.zeros(len(emb), np.float32) if vec is None else np.asarray(vec, np.float32))
    dim = len(images[0]) if images else 0
    return {
        "metadata": meta,
        "img_emb": np.stack(images).astype(np.float16) if images else np.zeros((0, dim), np.float16),
        "text_emb": (np.stack(text_rows).astype(np.float16) if text_rows else np.zeros((0, dim), np.float16))
        if with_text
        else None,
    }


class EmbeddingFiles:
    """A shard's embeddings rows gathered batch by batch (float16: 1.5 KiB a ViT-L/14 row, so
    15 MiB for a 10k-sample shard), written whole at commit."""

    def __init__(self):
        self.meta: list[dict] = []
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray] | None = None

    def add(self, part: dict) -> None:
        self.meta.extend(part["metadata"])
        self.images.append(part["img_emb"])
        if part["text_emb"] is not None:
            self.texts = (self.texts or []) + [part["text_emb"]]

    def files(self) -> dict[str, bytes]:
        """Each file's bytes by kind (img_emb, metadata, and text_emb where texts were embedded)."""
        images = [a for a in self.images if len(a)]
        dim = max((a.shape[1] for a in self.images), default=0)
        matrices = {"img_emb": np.concatenate(images) if images else np.zeros((0, dim), np.float16)}
        if self.texts is not None:
            texts = [a for a in self.texts if len(a)]
            matrices["text_emb"] = np.concatenate(texts) if texts else np.zeros((0, dim), np.float16)
        out = {}
        for kind, matrix in matrices.items():
            buf = io.BytesIO()
            np.save(buf, matrix, allow_pickle=False)
            out[kind] = buf.getvalue()
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.meta, schema=METADATA_SCHEMA), buf)
        out["metadata"] = buf.getvalue()
        return out


def pixel_hash(pixels: np.ndarray) -> str:
    """A decoded image's identity for exact-duplicate search: sha256 over its shape and RGB bytes
    (hex, 32 characters). Taken where the clip chain has the pixels (`stages.clip`)."""
    import hashlib

    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:32]


def model_identity(identity: dict) -> str:
    """The ``model`` column's value: the embedding model's run.json identity as compact JSON."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def attach_embeddings(run: str, shard: str, batch: dict) -> None:
    """Give a derived run's rows (`capfilt rethreshold`, `capfilt dedup`) the embeddings the source
    run ``run`` wrote for ``shard``, so that the new run writes them too (no model runs): each row's
    image embedding and, where written, the text embedding of its caption there (the derived run's
    caption rule then picks that same text, the one whose embedding it has)."""
    from capfilt.records import row_candidates

    folder = OutputFolder(run)

    def read(kind):
        return folder.read(shard_file(KINDS[kind], shard))

    meta = read("metadata")
    if meta is None:
        return
    rows = pq.read_table(io.BytesIO(meta)).to_pylist()
    images = np.load(io.BytesIO(read("img_emb")), allow_pickle=False)
    texts = read("text_emb")
    texts = np.load(io.BytesIO(texts), allow_pickle=False) if texts is not None else None
    at = {r["key"]: n for n, r in enumerate(rows)}
    n = len(batch["key"])
    batch["image_embedding"], batch["text_embeddings"] = [None] * n, [None] * n
    batch["embedding_model"] = [None] * n
    for i, key in enumerate(batch["key"]):
        r = at.get(key)
        if r is None or batch["failure"][i]:
            continue
        batch["image_embedding"][i] = images[r].astype(np.float32).tolist()
        batch["embedding_model"][i] = rows[r]["model"]
        if texts is not None:
            cands = row_candidates(batch, i)
            feats = [None] * len(cands)
            j = next((j for j, c in enumerate(cands) if c["text"] == rows[r]["caption"]), None)
            if j is not None:
                feats[j] = texts[r].astype(np.float32).tolist()
            batch["text_embeddings"][i] = feats
