"""Settings from YAML and flags: values coerced to each field's type, recipes split into stage sections, YAML
anchors and aliases bounded before any value is built, and every bad value one line that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sqltune.errors import SqltuneError

from sqltune.config.settings import shown
from sqltune.config.train import TrainConfig


# --------------------------------------------------------------------------------------------- loading
def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """A YAML or command-line value as the field's type. Never a silent change of meaning: a bool is not a number,
    1.5 is not an int, "false" is false, inf and nan are refused, a list is not a string."""
    tp, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    if value is None:
        raise SqltuneError(f"--{name} needs a value")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            number = float(value) if isinstance(value, (float, str)) else None
            if number is None or not math.isfinite(number) or not number.is_integer():
                raise ValueError
            return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(number)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise SqltuneError(f"--{name} must be a finite number, not {shown(value)}")
            return number
        if tp is str:
            if isinstance(value, (list, dict, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    type_name = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a single text value"}
    expected = type_name.get(getattr(tp, "__name__", ""), getattr(tp, "__name__", str(tp)))
    raise SqltuneError(f"--{name} expects {expected}, got {shown(value)}")


def build(cls, values: dict | None = None, where: str = "config"):
    """Make a `cls` from a plain dict, checking names and types; unknown keys are an error with a hint."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        norm = field_name(cls, key, where)
        kwargs[norm] = _coerce(norm, value, hints[norm])
    return cls(**kwargs)


def field_name(cls, key: Any, where: str) -> str:
    """`key` as one of `cls`'s field names (dashes read as underscores); an unknown name is an error with a hint."""
    names = [f.name for f in dataclasses.fields(cls)]
    norm = key.replace("-", "_") if isinstance(key, str) else key
    if norm not in names:
        close = difflib.get_close_matches(norm, names, n=1) if isinstance(norm, str) else []
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise SqltuneError(f"unknown option {shown(key)} in {where}{hint}")
    return norm


MAX_YAML_VALUES = 100_000  # a recipe holds hundreds; anchors and aliases may not expand past this


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document whose anchors and aliases expand to more than MAX_YAML_VALUES
    values (an alias bomb) or refer to themselves, before any value is built or used."""

    def construct_document(self, node):
        _expanded_size(node)
        return super().construct_document(node)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(root) -> int:
    """Values in the document with every alias expanded, counted on the node graph (each node once, depth first
    without recursion)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise SqltuneError(f"its anchors and aliases expand to more than {MAX_YAML_VALUES} values")
        elif id(node) in open_nodes:
            raise SqltuneError("an alias refers to the value that holds it")
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))
    return sizes[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as Python values, every failure one line naming `where`: malformed text, an alias bomb, a value
    YAML cannot build (a 13th month, an integer of thousands of digits), nesting too deep."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except SqltuneError as exc:
        raise SqltuneError(f"{where}: {exc}: refused") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SqltuneError(f"malformed YAML in {where}{at}: {problem}") from None
    except RecursionError:
        raise SqltuneError(f"malformed YAML in {where}: nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        raise SqltuneError(f"bad value in {where}: {str(exc).splitlines()[0][:120]}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SqltuneError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SqltuneError(f"{path} is not UTF-8 text (byte {exc.start}): is it really a YAML file?") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SqltuneError(f"{path} must hold a mapping of option names to values, not {type(data).__name__}")
    return data


STAGE_SECTIONS = ("prepare", "train", "merge", "predict", "evaluate")
RUN_KEYS = {"name", "stages", "compare_base", "runs_dir"}  # a run recipe's own keys, never a stage's


def is_recipe(data: dict) -> bool:
    """A run recipe has at least one stage section (`train: {...}`); a stage config file is flat."""
    return any(key in data for key in STAGE_SECTIONS)


def recipe_values(data: dict, section: str, cls, where: str = "recipe") -> dict:
    """A stage's values from a run recipe: the shared top-level keys it knows, then its own section on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in names and k not in RUN_KEYS and k not in STAGE_SECTIONS}
    own = data.get(section)
    if own is None:
        own = {}
    if not isinstance(own, dict):
        raise SqltuneError(f"{where}: the `{section}` section must be a mapping of option names to values, "
                           f"not {type(own).__name__}")
    values.update(own)
    return values


def _recipe_paths(data: dict, section: str) -> dict:
    """Where a stage run on its own finds what the recipe's earlier stages wrote when each ran on its own too:
    train reads `<prepare name>_train`, predict `<prepare name>_dev`, from prepare's `out` folder; merge reads the
    adapter in train's `output_dir`."""
    prep = data.get("prepare") if isinstance(data.get("prepare"), dict) else {}
    name = prep.get("name") or prep.get("source") or "spider"
    folder = {"dataset_dir": prep["out"]} if prep.get("out") else {}
    if section == "train":
        return {"dataset": f"{name}_train", **folder}
    if section == "predict":
        return {"dataset": f"{name}_dev", **folder}
    if section == "merge":
        train = data.get("train") if isinstance(data.get("train"), dict) else {}
        return {"adapter": train.get("output_dir") or TrainConfig.__dataclass_fields__["output_dir"].default}
    return {}


def load(cls, yaml_path: str | None = None, overrides: dict | None = None, section: str | None = None):
    """YAML values, then command-line overrides on top. Given a run recipe, a stage takes the recipe's shared keys
    and its own section, exactly as `sqltune run` does."""
    values: dict = {}
    if yaml_path:
        data = load_yaml(yaml_path)
        if section and is_recipe(data):
            data = {**_recipe_paths(data, section), **recipe_values(data, section, cls, where=str(yaml_path))}
        values.update(data)
    values.update(overrides or {})
    return build(cls, values, where=str(yaml_path or "the command line"))


def to_yaml(cfg) -> str:
    """The resolved config as YAML (what `--print_config` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def help_lines(cls) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<30} {f.metadata.get('help', '')} [default: {default!r}]")
    return lines
