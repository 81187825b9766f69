"""The models: capfilt's own BLIP compute (blip.py) behind the captioner and the ITM/ITC filter,
the CLIP reranker (open_clip), the load-time self-check against the stock classes (selfcheck.py),
presets, and the MED for training (stock transformers modules, med.py)."""
