"""Typed run configuration: YAML in, validated pydantic models out, with errors that name the key.

    base.py      `Strict` (what every section is), `ConfigError`, error formatting, path rules
    decoding.py  the captioner section: the one declaration of the decoding settings and prompt
    sections.py  the other sections of a run recipe (decode, filter, clip, decide, ..., ray)
    run.py       `RunConfig` (the recipe as a whole), its fingerprint, `parse_config` / `load_config`
    reading.py   recipes as YAML (duplicate keys refused) and `--set key=value` overrides

Every name is importable from ``capfilt.config``.
"""

from capfilt.config.base import ConfigError, Strict, absolute_path, flatten, format_errors, written
from capfilt.config.decoding import (
    DECODING_SETTINGS,
    DEFAULT_PROMPT,
    PER_SAMPLE,
    CaptionerConfig,
    DecodingConfig,
    DecodingGroup,
)
from capfilt.config.reading import read_yaml, set_dotted
from capfilt.config.run import NOT_OUTPUT_SETTINGS, RunConfig, load_config, output_settings, parse_config
from capfilt.config.sections import (
    AUTO_RANK,
    DEDUP_THRESHOLD,
    FILTER_SCORES,
    IMAGE_RULE_SIDES,
    IMAGE_RULES,
    LAION_MODE,
    MAX_TEXT_BYTES,
    MODEL_SECTIONS,
    RANK_BY,
    REMOVED_RAY_KEYS,
    SCORE_SECTION,
    SCORES,
    SOURCES,
    CascadeConfig,
    ClaimsConfig,
    ClipConfig,
    ClipModel,
    DecideConfig,
    DecodeConfig,
    EditConfig,
    FilterConfig,
    HeadConfig,
    MaxRule,
    MinRule,
    QualityConfig,
    RayConfig,
    Thresholds,
    WatermarkConfig,
    laion_mode,
)

__all__ = [
    "AUTO_RANK",
    "FILTER_SCORES",
    "IMAGE_RULE_SIDES",
    "LAION_MODE",
    "MODEL_SECTIONS",
    "RANK_BY",
    "SCORES",
    "SCORE_SECTION",
    "SOURCES",
    "laion_mode",
    "DECODING_SETTINGS",
    "DEDUP_THRESHOLD",
    "DEFAULT_PROMPT",
    "IMAGE_RULES",
    "MAX_TEXT_BYTES",
    "NOT_OUTPUT_SETTINGS",
    "PER_SAMPLE",
    "REMOVED_RAY_KEYS",
    "CaptionerConfig",
    "CascadeConfig",
    "ClaimsConfig",
    "ClipConfig",
    "ClipModel",
    "ConfigError",
    "DecideConfig",
    "DecodeConfig",
    "DecodingConfig",
    "DecodingGroup",
    "EditConfig",
    "FilterConfig",
    "HeadConfig",
    "MaxRule",
    "MinRule",
    "QualityConfig",
    "RayConfig",
    "RunConfig",
    "Strict",
    "Thresholds",
    "WatermarkConfig",
    "absolute_path",
    "flatten",
    "format_errors",
    "load_config",
    "output_settings",
    "parse_config",
    "read_yaml",
    "set_dotted",
    "written",
]
