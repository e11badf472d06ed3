"""params.yaml -> a frozen, typed config tree (one section per stage, plus `paths`).

`load_params(path, preset=None)` reads params.yaml, overlays `presets/<preset>.yaml` (a name or a
path) and validates the result. Unknown keys, missing keys, wrong types and out-of-range values
raise `ConfigError` naming the dotted key, the bad value and what was expected. Functions take the
narrowest section they need (e.g. `cfg.dvae`), never the whole tree.

The section models live in `dalle.config_sections`; this module owns loading and errors.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import reprlib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from dalle.config_sections import Params
from dalle.errors import ConfigError

__all__ = ["ConfigError", "Params", "load_params", "params_hash", "flatten", "resolve_preset",
           "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "presets"
_REPR = reprlib.Repr()  # bad values in messages: bounded, even for huge or self-referring ones
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 80, 80, 3


def parse_yaml(text: str, what: str) -> Any:
    """YAML text -> data with the safe loader; anything it cannot read (syntax, tags such as
    `!!python/object`, impossible dates, nesting too deep) is one ConfigError naming `what`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{what} is not valid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date 2020-13-45
        raise ConfigError(f"{what} is not valid YAML: {type(exc).__name__}: "
                          f"{_short(str(exc))}") from None


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    data = parse_yaml(text, f"{what} {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_preset(preset: str | Path) -> Path:
    """A preset given by name (`paper-12b`) or by path (`presets/paper-12b.yaml`)."""
    candidate = Path(preset)
    if candidate.suffix in {".yaml", ".yml"} and candidate.is_file():
        return candidate
    named = PRESET_DIR / f"{preset}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"preset {str(preset)!r} does not exist; known presets: {', '.join(known)}")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Overlay onto base, recursing into mappings; overlay values win."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed in the section that holds `loc` (for "did you mean" hints)."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _format_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    value = err.get("input")
    if kind == "missing":
        return f"{key}: missing required key"
    if not err["loc"] and kind == "value_error":  # a rule across sections (Params' validators)
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(err["loc"]), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "check the spelling against params.yaml"
        return f"{key}: unknown key (value {_REPR.repr(value)}); {hint}"
    return f"{key}: bad value {_REPR.repr(value)}: {err['msg'].lower()}"


def validate(raw: dict[str, Any], source: str = "params", overridden: Iterable[str] = ()) -> Params:
    """Validate a raw mapping into the frozen tree; the first problem becomes one ConfigError line
    (naming the `-S` override that set the bad value when one did)."""
    try:
        return Params.model_validate(raw)
    except RecursionError:
        raise ConfigError(f"{source}: a value is nested too deeply (or refers to itself)") from None
    except ValidationError as exc:
        # unknown keys first: a typo also shows up as the missing key it was meant to be
        errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        key = ".".join(str(p) for p in errors[0]["loc"])
        culprit = [k for k in overridden if key == k or key.startswith(k + ".")]
        where = f"{source} (override -S {culprit[-1]}=...)" if culprit else source
        raise ConfigError(f"{where}: {_format_error(errors[0])}{more}") from None


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw mapping."""
    if not _KEY.match(dotted):
        raise ConfigError(f"override key {_REPR.repr(dotted)} is not a dotted params key such as "
                          "prior.n_layers")
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` -> (dotted key, value parsed as YAML, exactly as in params.yaml)."""
    if "=" not in item:
        raise ConfigError(f"override {_REPR.repr(item)} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    return key, parse_yaml(text, f"override {_REPR.repr(item)}")


def load_raw(path: str | Path = "params.yaml", preset: str | Path | None = None,
             overrides: Iterable[str] = ()) -> dict[str, Any]:
    raw = _read_yaml(Path(path), "params file")
    if preset:
        raw = deep_merge(raw, _read_yaml(resolve_preset(preset), "preset"))
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return raw


def load_params(path: str | Path = "params.yaml", preset: str | Path | None = None,
                overrides: Iterable[str] = ()) -> Params:
    """params.yaml (+ preset overlay + `key=value` overrides) -> validated, frozen `Params`."""
    source = str(path) + (f" + preset {preset}" if preset else "")
    overrides = list(overrides)
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    return validate(load_raw(path, preset, overrides), source, keys)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"prior.n_layers": 4, ...} (dotted names, as MLflow params)."""
    if hasattr(tree, "model_dump"):
        tree = tree.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = tree
    return out


def params_hash(section: Any) -> str:
    """Stable short hash of a config (sub)tree: same values, same hash."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
