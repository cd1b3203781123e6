"""One command-line parser for every config dataclass of the recipes (``TrainConfig``, ``SweepConfig``): a YAML file
(``--config FILE``) sets the defaults, ``--field value`` flags override them."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import textwrap
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..docstrings import field_type_name
from ..errors import ConfigError
from ..renames import current_names
from .config import TrainConfig

NO_CONFIG = "none"  # --config none: start from the dataclass's defaults alone
PRECEDENCE = ("Precedence, lowest first: {name}'s defaults < the config file (--config FILE; {default}) < "
              "command-line flags. '--config {none}' starts from {name}'s defaults alone; so does a --method other "
              "than the default file's, given without --config.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown as ``(default: X)``, or ``(default: X, from FILE)`` for the values a config file sets; the
    ``--no_<field>`` switches show none (their field's default is the one that counts)."""

    def __init__(self, prog, from_file: dict[str, str] | None = None, **kwargs):
        super().__init__(prog, **kwargs)
        self.from_file = from_file or {}

    def _get_help_string(self, action):
        text = action.help or ""
        if any(option.startswith("--no_") for option in action.option_strings):
            return text
        if action.dest in self.from_file and action.default is not argparse.SUPPRESS:
            return f"{text} (default: {action.default}, from {self.from_file[action.dest]})"
        return super()._get_help_string(action)


def _flag_value(argv: list[str], name: str, needs: str) -> str | None:
    """The value of ``--name`` in ``argv`` (``--name VALUE`` or ``--name=VALUE``), or None when absent; ``needs``
    says what a missing value should have been."""
    for index, argument in enumerate(argv):
        if argument == f"--{name}":
            if index + 1 >= len(argv):
                raise ConfigError(name, f"--{name} needs a value: {needs}.")
            return argv[index + 1]
        if argument.startswith(f"--{name}="):
            return argument.partition("=")[2]
    return None


def _as_flag_value(value):
    """A YAML value as its string field expects it: a mapping as one-line YAML, a list as comma-separated items."""
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def _other_method(argv: list[str], default_config: Path) -> bool:
    """Whether ``argv`` sets ``--method`` to another method than the default config file's."""
    method = _flag_value(argv, "method", "a method name")
    if method is None or not default_config.is_file():
        return False
    values = yaml.safe_load(default_config.read_text()) or {}
    return isinstance(values, dict) and "method" in values and values["method"] != method


def _read_config_file(path: Path, config_class: type) -> dict:
    """A config file's fields of ``config_class``, as parser defaults (mappings and lists of string fields written
    back as their flag values)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    strings = {f.name for f in dataclasses.fields(config_class) if field_type_name(f).startswith("str")}
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("config", f"--config {path}: not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(values, dict):
        raise ConfigError("config", f"--config {path}: expected a mapping of {config_class.__name__} fields, got a "
                                    f"{type(values).__name__}.")
    values = current_names(values, getattr(config_class, "renamed_fields", {}), f"--config {path}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError("config", f"{path}: unknown fields {unknown}; valid fields: {sorted(known)}.")
    return {key: _as_flag_value(value) if key in strings else value for key, value in values.items()}


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (as a user would type it)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def build_parser(default_config: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
                 config_class: type = TrainConfig) -> HfArgumentParser:
    """The command-line parser of ``config_class`` (plus ``--config``), its defaults taken from ``config_file``."""
    name = config_class.__name__
    default = f"default: {_shown(default_config)}" if default_config is not None else "none by default"
    description = textwrap.fill(PRECEDENCE.format(name=name, default=default, none=NO_CONFIG), 100)
    parser = HfArgumentParser(config_class, description=description, allow_abbrev=False)  # flags as typed, in full
    config_help = (f"YAML file of {name} fields; its values replace {name}'s defaults and flags override them. "
                   f"'{NO_CONFIG}': {name}'s defaults alone.")
    parser.add_argument("--config", type=str, default=_shown(default_config) if default_config else None,
                        help=config_help)
    from_file = {}
    if config_file is not None:
        path = Path(config_file)
        values = _read_config_file(path, config_class)
        parser.set_defaults(**values)
        from_file = dict.fromkeys(values, path.name)
    parser.formatter_class = functools.partial(_HelpFormatter, from_file=from_file)
    switches = getattr(config_class, "SWITCH_OFF_HELP", {})
    for action in parser._actions:
        names = [option for option in action.option_strings if option.startswith("--no_")]
        if names:
            field_name = names[0][len("--no_"):]
            action.help = switches.get(field_name) or f"Turn --{field_name} off."
    return parser


def parse_config(argv: list[str] | None = None, default_config: str | os.PathLike | None = None,
                 config_class: type = TrainConfig):
    """A ``config_class`` (``TrainConfig`` by default) from command-line arguments, by one precedence rule (lowest
    first): the dataclass's defaults < the config file < flags.

    The config file is ``--config FILE``, else ``default_config`` (the recipe passes its demo config) unless the
    command line names another ``--method`` than that file (its method's settings would not fit); ``--config none``
    uses no file. Any ``--field value`` overrides the file. A bad value raises ``ConfigError`` naming the flag,
    a missing config file ``FileNotFoundError``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _flag_value(argv, "config", "a YAML file, or 'none'")
    if chosen is None and default_config is not None and not _other_method(argv, Path(default_config)):
        chosen = str(default_config)
    if chosen is not None and chosen.lower() == NO_CONFIG:
        chosen = None
    parser = build_parser(default_config, chosen, config_class)

    def refuse(message: str):
        raise ConfigError("command line", f"{message} (see --help)")

    parser.error = refuse  # one clear error instead of argparse's usage block and SystemExit
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        refuse(f"unrecognised arguments: {' '.join(remaining)}")
    values = vars(namespace)
    return config_class(**{f.name: values[f.name] for f in dataclasses.fields(config_class) if f.init})
