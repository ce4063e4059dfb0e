"""Configuration: option schemas, YAML layers and the precedence flag > YAML > default.

Every command declares its options once as a list of `Option`s: the attack scripts (defaults <
prototype YAML < attack YAML < flags) and the record commands `ft.py`, `ft_poison.py`, `qra.py`
(defaults < `--yaml_path` < flags, `parse_command`). From that list come the argparse flags (every
YAML key has a flag), the YAML validation (an unknown key is an error that lists the valid ones; a
value of the wrong type is an error naming the key) and the resolved dictionary that is saved
beside every result.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from utils.errors import UserError, interactive

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_progress(text: Any) -> bool:
    """A `progress` setting: true, false, or `auto` (the default), which draws bars only when the
    output goes to a terminal, not to a log file or a pipe."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return interactive()
    return parse_bool(text)


def parse_optional_float(text: Any) -> float | None:
    if text is None or str(text).strip().lower() in ("none", "null", ""):
        return None
    return float(text)


@dataclass(frozen=True)
class Option:
    """One configuration key; `kind` converts a YAML value or a flag's text."""

    name: str
    kind: Callable[[Any], Any]
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    yaml: bool = True  # False for flags that only make sense on the command line
    #: how the flag is written: "value" (--x V), "switch" (--x alone means true) or "optional"
    #: (--x alone means true, --x V gives V)
    flag: str = "value"
    #: a range check: value -> None when fine, else what it must be ("must be positive"); not run on None
    check: Callable[[Any], str | None] | None = None

    def convert(self, value: Any, source: str) -> Any:
        if value is None and self.default is None:
            return None
        try:
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if self.kind is int and isinstance(value, bool):
                raise ValueError
            out = self.kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: {self.name} must be {_kind_name(self.kind)}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise UserError(f"{source}: {self.name} must be one of {', '.join(map(str, self.choices))}; got {out!r}")
        problem = self.check(out) if self.check is not None and out is not None else None
        if problem:
            where = source if source == f"--{self.name}" else f"{source}: {self.name}"
            raise UserError(f"{where} {problem}, got {out}")
        return out


# range checks for Option.check
def positive(value) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be positive"


def non_negative(value) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be 0 or positive"


def within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], str | None]:
    """value in [low, high], with either end open."""
    def check(value) -> str | None:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        return None if ok else f"must be within {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return check


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", parse_bool: "true or false",
            parse_progress: "true, false or auto",
            parse_optional_float: "a number or none"}.get(kind, kind.__name__)


def resolve_path(given: str | Path, script_dir: Path | None = None, what: str = "file") -> Path:
    """Find a path as given (relative to the working directory), else relative to the entry
    script's folder (the original code's `../config/...`), else to the repository root."""
    given = Path(given)
    candidates = [given]
    if not given.is_absolute():
        if script_dir is not None:
            candidates.append(script_dir / given)
        candidates.append(REPO_ROOT / given)
        # `../config/x.yaml` from the repository root means `config/x.yaml`
        parts = given.parts
        if parts and parts[0] == "..":
            candidates.append(REPO_ROOT / Path(*parts[1:]))
    for cand in candidates:
        if cand.is_file():
            return cand
    raise UserError(f"{what} {str(given)!r} not found (looked in: {', '.join(str(c) for c in _unique(candidates))})")


def _unique(paths):
    seen, out = set(), []
    for p in paths:
        key = str(p.resolve()) if p.is_absolute() or p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def load_yaml(path: Path, options: Sequence[Option]) -> dict[str, Any]:
    """Read a YAML mapping and check every key against the schema."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    valid = {o.name: o for o in options if o.yaml}
    unknown = sorted(set(map(str, data)) - set(valid))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    return {k: valid[k].convert(v, str(path)) for k, v in data.items()}


def build_parser(options: Sequence[Option], description: str, yaml_flags: Sequence[tuple[str, str, str]] = ()) -> argparse.ArgumentParser:
    """Flags for every option, defaulting to 'not given' so that YAML values are not shadowed."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for flag, default, help_text in yaml_flags:
        parser.add_argument(f"--{flag}", default=default, help=help_text)
    for opt in options:
        extra = f" (default: {opt.default})" if opt.default is not None and "default" not in opt.help else ""
        choices = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
        help_text = opt.help + choices + extra
        if opt.flag == "switch":
            parser.add_argument(f"--{opt.name}", action="store_const", const="true", help=help_text)
        elif opt.flag == "optional":
            parser.add_argument(f"--{opt.name}", nargs="?", const="true", metavar=opt.name.upper(), help=help_text)
        else:
            parser.add_argument(f"--{opt.name}", type=str, metavar=opt.name.upper(), help=help_text)
    return parser


def parse_command(options: Sequence[Option], argv: Sequence[str] | None, description: str,
                  script_dir: Path | None = None) -> argparse.Namespace:
    """Defaults < `--yaml_path` (a YAML of any of the options) < flags, every value converted and
    checked. Returns the resolved settings as a namespace (`yaml_path` included, portable)."""
    parser = build_parser(options, description, [
        ("yaml_path", None, "YAML file of settings: any of the options below as keys (e.g. config/defense/pam.yaml); "
                            "flags win over it"),
    ])
    args = vars(parser.parse_args(argv))
    given = args.pop("yaml_path", None)
    layers = []
    if given:
        path = resolve_path(given, script_dir, "settings YAML")
        layers.append((str(path), load_yaml(path, options)))
        given = str(path)
    cfg = resolve(options, layers, args)
    cfg["yaml_path"] = given
    return argparse.Namespace(**cfg)


def resolve(options: Sequence[Option], layers: Sequence[tuple[str, dict[str, Any]]], cli: dict[str, Any]) -> dict[str, Any]:
    """Defaults < each YAML layer in order < command-line flags; every value converted and checked."""
    by_name = {o.name: o for o in options}
    cfg = {o.name: _default(o) for o in options}
    for _source, layer in layers:
        cfg.update(layer)
    for key, value in cli.items():
        if key in by_name:
            cfg[key] = by_name[key].convert(value, f"--{key}")
    return cfg


def _default(opt: Option) -> Any:
    """An option's built-in default; `progress: auto` is decided here, when the command runs, since
    it depends on where this run's output goes."""
    return opt.kind(opt.default) if opt.kind is parse_progress else opt.default


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
