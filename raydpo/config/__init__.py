"""The run configuration: typed sections (:mod:`.sections`, :mod:`.online`), YAML parsing and
overrides (:mod:`.schema`, :mod:`.loading`), and the rules over a whole config (:mod:`.rules`).

A config is loaded from YAML, then dotted ``key=value`` overrides are applied, then it is validated.
Torch-free: loading and checking a config stays instant.
"""

from raydpo.config.schema import ConfigError
from raydpo.config.rules import (
    loss_names, loss_weights, pool_size, reference_dtype, reference_path, reference_trusts_code, uses_reference, validate,
)
from raydpo.config.online import GeneratorConfig, JudgeConfig, OnlineConfig
from raydpo.config.sections import (
    Config, DataConfig, LoggingConfig, LoraConfig, LossConfig, ModelConfig, OutputConfig, RayConfig, ReferenceConfig, TrainConfig,
)
from raydpo.config.loading import apply_overrides, dump, from_dict, load, to_dict

__all__ = ["Config", "ConfigError", "DataConfig", "GeneratorConfig", "JudgeConfig", "LoggingConfig", "LoraConfig", "LossConfig",
           "ModelConfig", "OnlineConfig", "OutputConfig", "RayConfig", "ReferenceConfig", "TrainConfig", "apply_overrides", "dump",
           "from_dict", "load", "loss_names", "loss_weights", "pool_size", "reference_dtype", "reference_path",
           "reference_trusts_code", "to_dict", "uses_reference", "validate"]
