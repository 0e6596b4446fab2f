"""Reading a recipe YAML file: a mapping of keys, or a ``ConfigError`` naming the file, the line and the fix.

Near the bottom of the package, above ``config_base`` (where ``ConfigError`` lives) and beside ``models/``:
training reads recipes with it, and so do the commands that take a target shape from a recipe.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from llmshearing.config_base import ConfigError


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_recipe(yaml_path: str) -> DictConfig:
    """The recipe at ``yaml_path`` as a mapping; YAML that does not parse, or that is not a mapping of
    keys, is a ``ConfigError`` naming the file, the line and the fix."""
    import yaml

    try:
        recipe = OmegaConf.load(yaml_path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "its text"
        problem = getattr(err, "problem", None) or first_line(err)
        hint = "; indent with spaces, not tabs" if "\t" in _line_at(yaml_path, mark) else ""
        raise ConfigError(f"{yaml_path} is not valid YAML ({problem} at {where}){hint}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{yaml_path} is not a text file; pass a YAML recipe (see yamls/)") from None
    except Exception as err:  # omegaconf refuses some YAML (e.g. keys that are not strings)
        raise ConfigError(f"{yaml_path} cannot be read as a recipe ({first_line(err)})") from None
    if isinstance(recipe, DictConfig) and not recipe:
        raise ConfigError(f"{yaml_path} holds no keys; a recipe is `key: value` lines (see yamls/)")
    if not isinstance(recipe, DictConfig):
        kind = "a list" if OmegaConf.is_list(recipe) else f"a {type(recipe).__name__}"
        raise ConfigError(
            f"{yaml_path} holds {kind}, not a mapping of keys; a recipe is `key: value` lines (see yamls/)"
        )
    return recipe


def _line_at(path: str, mark: object) -> str:
    """The text of the line a YAML error points at ("" when unknown)."""
    if mark is None:
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    index = getattr(mark, "line", -1)
    return lines[index] if 0 <= index < len(lines) else ""
