"""Typed configuration: schema, YAML loading with dotted overrides, validation."""

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import dump_config, load_config, to_dict
from megatron_vwn.config.schema import (
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron_vwn.config.validation import validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "RunConfig", "TrainConfig", "dump_config", "load_config", "to_dict", "validate",
]
