"""Typed configuration: `load_config(path, overrides=[...])` -> `Config`."""
from megams.config.loader import ConfigError, config_from_dict, dump_config, load_config, parse_override
from megams.config.schema import (ActivationCheckpointConfig, CheckpointConfig, Config, DataConfig, LoggingConfig,
                                  ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig)

__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "ParallelConfig", "OptimizerConfig", "TrainingConfig",
           "CheckpointConfig", "LoggingConfig", "ActivationCheckpointConfig", "load_config", "config_from_dict",
           "dump_config", "parse_override"]
