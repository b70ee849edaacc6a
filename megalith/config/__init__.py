"""megalith's configuration: one package, one module per section, validators written once.

- `layout`: the Layout value (every parallel axis and its divisibility rules) and its text grammar;
- `model`, `parallel`, `precision`, `optimizer`, `training`, `data`, `checkpoint`, `logs`: the
  sections, frozen dataclasses whose fields are Megatron's flags;
- `validators`: the shared checks; `flags`: `--flags` generated from the fields;
- `pretrain`: PretrainConfig, the sections resolved together; `arguments` and `yaml_file`:
  the command line and `--config FILE.yaml`, both read through the same fields.

Only the leaf modules are re-exported here, so models and layers can import the config without
pulling in `pretrain` (which depends on the model registry).
"""

from megalith.config.flags import add_config_arguments, config_from_arguments, explicit_flags, flag_field
from megalith.config.layout import Layout, parse_layout
from megalith.config.model import ModelConfig

__all__ = ["Layout", "ModelConfig", "add_config_arguments", "config_from_arguments", "explicit_flags", "flag_field",
           "parse_layout"]
