"""The edit stage (config section ``edit``, off unless set): after Decide, a seq2seq model
(capfilt/modeling/editor.py, e.g. a grammar-fixing T5 as LAION-COCO used) rewrites the selected
caption of every kept sample. The ledger keeps the selected text as it was scored and adds the
rewrite as ``edited_text``; the cleaned sample's ``.txt`` is the rewrite (``.json``: ``caption``
and ``caption_original``). Nothing is re-decided: the rewrite is not scored.
"""

from __future__ import annotations

from capfilt.records import KEPT
from capfilt.stages.isolate import isolating


def selected_text(batch: dict, i: int) -> str:
    """The text Decide selected for row ``i``: candidate 0 is the web text, 1..K the captions (as
    trimmed to its supported claims, when the claims section trimmed it)."""
    j = batch["selected"][i]
    trimmed = batch["trimmed"][i] if "trimmed" in batch else None
    if trimmed and trimmed[j]:
        return trimmed[j]
    return batch["web_text"][i] if j == 0 else batch["captions"][i][j - 1]


class Edit:
    """Adds `edited`: the rewritten selected caption of each kept row ("" when the model wrote
    nothing: the original stays the caption), None elsewhere. A batch the model raises on is
    retried per sample; a sample it still raises on fails (model_error)."""

    section = "edit"  # its config section

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        # self_check is accepted like every model stage's, and unused: the editor calls the stock
        # model's own generate(), so no compute of capfilt's needs comparing with it (editor.py).
        self.editor = None
        if config is not None:
            from capfilt.modeling.editor import Editor

            self.editor = Editor(
                config.model,
                revision=config.revision,
                device=device,
                precision=precision,
                prompt=config.prompt,
                max_new_tokens=config.max_new_tokens,
                num_beams=config.num_beams,
                batch_size=config.batch_size,
            )

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        edited = [None] * n
        if self.editor is None:
            return {**batch, "edited": edited}
        failures, details = list(batch["failure"]), list(batch["detail"])
        rows = [i for i in range(n) if not failures[i] and batch["status"][i] == KEPT]
        texts = [selected_text(batch, i) for i in rows]
        for i, text in zip(rows, isolating(self.editor.edit, rows, [texts], failures, details)):
            edited[i] = text
        return {**batch, "edited": edited, "failure": failures, "detail": details}
