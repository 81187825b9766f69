"""Runners: `local` (in-process, the default) and `ray` (Ray Data; the only package importing ray)."""
