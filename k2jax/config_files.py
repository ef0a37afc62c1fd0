"""Where a config's plain data comes from: YAML files with their `base:` chains, the presets
shipped in the package, and `section.key=value` overrides (typed as YAML scalars). The result is
a dict; k2jax/config.py turns it into the typed Config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from k2jax.errors import ConfigError, UserError


def _parse_override_value(text: str) -> Any:
    # YAML scalars: 4 -> int, 1e-4 -> float, true -> bool, null -> None, [1, 2] -> list.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)  # PyYAML reads "1e-4" as a string
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, f"'{part}' is not a section")
        node[parts[-1]] = _parse_override_value(text)
    return data



class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last
    one silently, so an edit to the first copy would change nothing."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a dict, with its `base:` chain merged in.

    `base: FILE` (relative to this file's directory) names the config this one extends: its
    mappings are merged key by key, anything else (numbers, lists) is replaced. So K2-Chat's
    file states only what differs from K2's."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path}: is a directory, expected a YAML file")
    if not path.is_file():
        raise UserError(f"config file {path}: not found")
    if path.resolve() in _seen:
        raise UserError(f"config file {path}: 'base' chain loops back to itself")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as dup:
        raise UserError(f"config file {path}:{dup.line}: key '{dup.key}' is given twice in "
                        f"one section (YAML would keep the last one silently)") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path}: not valid YAML ({err.__class__.__name__})")
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"config file {path}: 'base' must be a file name, got {base!r}")
    return _merged(read_config_file(path.parent / base, _seen + (path.resolve(),)), data)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_maps else value
    return out


# configs/ of the repository, reached through the link k2jax/configs (package data in a wheel).
PRESET_DIR = Path(__file__).resolve().parent / "configs"
K2_PRESET = "k2-65b"  # K2's figures: the default config of commands that read K2's data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file: `path` itself when it exists, else a preset of the package named by it
    (`k2-65b` or `k2-65b.yaml`), so an installed wheel reaches K2's config without a clone."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    preset = PRESET_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if not preset.is_file():
        raise UserError(f"config file {path}: not found (nor a preset: "
                        f"{', '.join(preset_names())})")
    return preset


def load_config_dict(path: str | Path | None, overrides: list[str] | None = None
                     ) -> dict[str, Any]:
    """The plain dict `load_config` builds from: the file (or preset) and the overrides."""
    data = read_config_file(resolve_config_path(path)) if path is not None else {}
    return apply_overrides(data, overrides or [])
