"""Configuration: dataclasses with one docstring per field (`fields`), read from YAML and the
command line (`parse`), checked in one place (`validate`), documented from the docstrings
(`reference`). Precedence is CLI > YAML file > defaults; a YAML file and the command line use the
same dotted names (`train.lr=0.05`).
"""

from launch.config.fields import Config
from launch.config.parse import from_dict, load, read_yaml, save
from launch.config.reference import field_docs, reference, reference_markdown

__all__ = ["Config", "field_docs", "from_dict", "load", "read_yaml", "reference", "reference_markdown", "save"]
