"""Typed configuration for every stage: the settings (settings.py; train.py and samples.py for those stages) and how
YAML recipes and `--name value` flags fill them (loading.py). Import from here: `from sqltune.config import
PredictConfig, load`."""

from sqltune.config.loading import (RUN_KEYS, STAGE_SECTIONS, build, field_name, help_lines, is_recipe, load,
                                    load_yaml, parse_yaml, recipe_values, to_dict, to_yaml)
from sqltune.config.settings import (SCHEMA_STYLES, SOURCES, TEMPLATES, AskConfig, EvalConfig, MergeConfig,
                                   PredictConfig, PrepareConfig, ServeConfig, arg, predict_settings, serve_settings,
                                   shown)
from sqltune.config.train import FINETUNING_TYPES, TrainConfig
from sqltune.config.samples import SamplesConfig

__all__ = ["FINETUNING_TYPES", "RUN_KEYS", "SCHEMA_STYLES", "SOURCES", "STAGE_SECTIONS", "TEMPLATES", "AskConfig",
           "EvalConfig", "MergeConfig", "PredictConfig", "PrepareConfig", "SamplesConfig", "ServeConfig", "TrainConfig",
           "arg", "build", "field_name", "help_lines", "is_recipe", "load", "load_yaml", "parse_yaml", "predict_settings",
           "recipe_values", "serve_settings", "shown", "to_dict", "to_yaml"]
