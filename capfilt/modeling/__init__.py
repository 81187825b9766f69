"""Captioner, ITM/ITC filter, CLIP reranker and the MED, built from transformers / open_clip modules."""
