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
import re
import reprlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from utils.errors import UserError, interactive

REPO_ROOT = Path(__file__).resolve().parents[1]

#: a settings or config file larger than this is refused before it is parsed (the shipped ones are < 2 KB)
MAX_CONFIG_BYTES = 1 << 20
#: the longest string a single option takes (a path, a name, a list of widths)
MAX_TEXT = 4096
#: integers beyond 64 bits break torch (seeds, sizes); every int option is within this
INT_LIMIT = 2**63 - 1

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 70
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4


def short(value: Any, limit: int = 80) -> str:
    """A repr of `value` for error messages, at most `limit` characters: user input (a flag's text,
    a YAML value) may be huge, and one error line must stay one readable line. Nested values are
    cut by depth and length first, so that even a deeply shared structure costs little to print."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut(text: str, limit: int = 300) -> str:
    """`text` shortened to `limit` characters (messages that embed a user's value)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {short(text)}")


def parse_progress(text: Any) -> bool:
    """A `progress` setting: true, false, or `auto` (the default), which draws bars only when the
    output goes to a terminal, not to a log file or a pipe."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return interactive()
    return parse_bool(text)


def parse_optional_float(text: Any) -> float | None:
    if text is None or str(text).strip().lower() in ("none", "null", ""):
        return None
    return _float(text)


def _float(value: Any) -> float:
    if isinstance(value, bool):  # YAML `lr: true` is not a number
        raise ValueError
    return float(value)


@dataclass(frozen=True)
class Option:
    """One configuration key; `kind` converts a YAML value or a flag's text."""

    name: str
    kind: Callable[[Any], Any]
    default: Any
    help: str
    choices: Sequence[Any] | None = None
    yaml: bool = True  # False for flags that only make sense on the command line
    #: how the flag is written: "value" (--x V) or "optional" (--x alone means true, --x V gives V);
    #: every parse_bool option is written "optional" whatever this says ("switch" is kept as a
    #: synonym for older option lists)
    flag: str = "value"
    #: a range check: value -> None when fine, else what it must be ("must be positive"); not run on None
    check: Callable[[Any], str | None] | None = None
    #: a float option takes nan / inf only when this says so (none does today): a NaN learning rate
    #: trains to NaN weights and reports nonsense instead of failing
    allow_nonfinite: bool = False

    def convert(self, value: Any, source: str) -> Any:
        """The value from a YAML file or a flag's text, converted, range-checked, or a UserError
        naming `source` and the option (the offending value cut to a readable length)."""
        if value is None and self.default is None:
            return None
        where = source if source == f"--{self.name}" else f"{source}: {self.name}"
        if isinstance(value, (list, dict, tuple, set)):  # no option takes a structure
            raise UserError(f"{where} must be {_kind_name(self.kind)}, got a YAML {type(value).__name__}: {short(value)}")
        if isinstance(value, str) and (len(value) > MAX_TEXT or "\x00" in value):
            raise UserError(f"{where} must be at most {MAX_TEXT} characters without NUL bytes, got {short(value)}")
        kind = _float if self.kind is float else self.kind
        try:
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if self.kind is int and isinstance(value, bool):
                raise ValueError
            out = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{where} must be {_kind_name(self.kind)}, got {short(value)}") from None
        if isinstance(out, float) and not math.isfinite(out) and not self.allow_nonfinite:
            raise UserError(f"{where} must be a finite number, got {short(value)}")
        if self.choices is not None and out not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {short(out)}")
        problem = self.check(out) if self.check is not None and out is not None else None
        if problem:
            raise UserError(f"{where} {problem}, got {short(out, 40)}")
        if isinstance(out, int) and not isinstance(out, bool) and abs(out) > INT_LIMIT:
            raise UserError(f"{where} must fit in 64 bits (at most 2**63 - 1 either way), got {short(out, 40)}")
        return out


# range checks for Option.check
def positive(value) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be positive"


def non_negative(value) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be 0 or positive"


def seed(value) -> str | None:
    """A random seed: what torch.manual_seed, numpy and the derived seeds all accept."""
    return None if 0 <= value <= INT_LIMIT else "must be within [0, 2**63 - 1]"


_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:[0-9]{1,3})?)")


def device(value) -> str | None:
    """A device name as `engine.resolve_device` takes it (checked before any work starts)."""
    return None if _DEVICE.fullmatch(value.strip()) else "must be auto, cpu, cuda, cuda:N or mps"


def registered(names: Callable[[], Any], allow_empty: bool = False) -> Callable[[Any], str | None]:
    """The value is a name in a registry (read when checked, so later registrations count), or
    empty when `allow_empty`. Names given on the command line are looked up, never turned into
    paths or module names."""
    def check(value) -> str | None:
        known = list(names())
        if value in known or (allow_empty and value == ""):
            return None
        return f"is not one of: {', '.join(map(str, known))}{' (or empty)' if allow_empty else ''}"
    return check


def folder_path(value) -> str | None:
    """A folder the run reads or writes under: not empty. An empty value would quietly mean the
    working directory (a record written into the repository's own root, say); `.` says so."""
    return None if str(value).strip() else "must name a folder (for the current folder, pass .)"


_TAG = re.compile(r"[A-Za-z0-9_.-]{0,64}")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def tag(value) -> str | None:
    """A tag that becomes part of a folder name: empty, or up to 64 letters, digits, '-', '_', '.'."""
    return None if _TAG.fullmatch(value) else "may hold only up to 64 letters, digits, '-', '_' and '.'"


_FOLDER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def folder_name(value) -> str | None:
    """One plain folder name (no path separators, not hidden): what defense/<name>/ may be."""
    return None if _FOLDER.fullmatch(value) else "is not a folder name (letters, digits, '-', '_', '.'; not hidden)"


def folder_names(value) -> str | None:
    """A comma-separated list of plain folder names."""
    names = [n.strip() for n in value.split(",")]
    return None if all(_FOLDER.fullmatch(n) for n in names) and len(names) <= 64 else \
        "is not a folder name or a comma-separated list of them (letters, digits, '-', '_', '.'; not hidden)"


def dotted_name(value) -> str | None:
    """An attribute path such as classifier.6."""
    return None if _DOTTED.fullmatch(value) and len(value) <= 200 else "must be a dotted attribute path such as classifier.6"


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
    if given.is_dir():
        raise UserError(f"{what} {short(str(given))} is a folder, not a file")
    if given.exists():  # a device, FIFO or socket: reading it would block or never end
        raise UserError(f"{what} {short(str(given))} is not a regular file")
    raise UserError(cut(f"{what} {short(str(given))} not found (looked in: {', '.join(str(c) for c in _unique(candidates))})", 600))


def _unique(paths):
    seen, out = set(), []
    for p in paths:
        key = str(p.resolve()) if p.is_absolute() or p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


class _ConfigLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases. A settings file is a flat list of key: value lines and
    never needs them; refusing them outright bounds what a small file can expand to (nested aliases,
    "billion laughs", turn 1 KB into gigabytes once anything walks or prints the value)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not accepted",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One short line out of PyYAML's multi-line message: the problem and where."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return cut(f"{problem}{where}", 200)


def read_yaml(path: str | Path) -> Any:
    """The content of a YAML file, read safely: at most MAX_CONFIG_BYTES, UTF-8, no anchors or
    aliases, no Python objects. Every failure is a UserError naming the file."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a folder, /dev/zero, a pipe: never read to the end
            raise UserError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a settings file may hold at most "
                            f"{MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not a YAML settings file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None


def load_yaml(path: Path, options: Sequence[Option]) -> dict[str, Any]:
    """Read a YAML mapping and check every key against the schema."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    valid = {o.name: o for o in options if o.yaml}
    unknown = sorted(set(map(str, data)) - set(valid))
    if unknown:
        shown = ", ".join(cut(k, 40) for k in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise UserError(f"{path}: unknown key(s) {shown}; valid keys: {', '.join(sorted(valid))}")
    return {k: valid[k].convert(v, str(path)) for k, v in data.items()}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one `error:` line (naming the flag and pointing
    to --help), exit status 2, like every other mistake, instead of a usage block."""

    def error(self, message: str):
        raise UserError(f"{cut(message)} (see {self.prog} --help)")


def default_text(value: Any) -> str:
    """How help prints a default: true/false, none, empty, or the value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if value == "":
        return "empty"
    return str(value)


def help_requested(argv: Sequence[str] | None) -> bool:
    args = list(sys.argv[1:] if argv is None else argv)
    args = args[: args.index("--")] if "--" in args else args
    return "-h" in args or "--help" in args


def build_parser(options: Sequence[Option], description: str, yaml_flags: Sequence[tuple[str, str, str]] = (),
                 shown_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """Flags for every option, defaulting to 'not given' so that YAML values are not shadowed. Every
    help line states its default: the option's own, or (`shown_defaults`) what the YAML files given
    resolve to. A boolean flag alone means true and also takes true/false."""
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for flag, default, help_text in yaml_flags:
        parser.add_argument(f"--{flag}", default=default, help=f"{help_text} (default: {default_text(default)})")
    shown_defaults = shown_defaults or {}
    for opt in options:
        if opt.name in shown_defaults:
            extra = f" (default here: {default_text(shown_defaults[opt.name])})"
        else:
            extra = "" if "default" in opt.help else f" (default: {default_text(opt.default)})"
        choices = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
        help_text = opt.help + choices + extra.replace("%", "%%")
        if opt.kind is parse_bool or opt.flag in ("switch", "optional"):
            parser.add_argument(f"--{opt.name}", nargs="?", const="true", metavar="true|false", help=help_text)
        else:
            parser.add_argument(f"--{opt.name}", type=str, metavar=opt.name.upper(), help=help_text)
    return parser


def parse_command(options: Sequence[Option], argv: Sequence[str] | None, description: str,
                  script_dir: Path | None = None) -> argparse.Namespace:
    """Defaults < `--yaml_path` (a YAML of any of the options) < flags, every value converted and
    checked. Returns the resolved settings as a namespace (`yaml_path` included, portable). With
    --help and --yaml_path, the help shows the defaults the YAML gives."""
    yaml_flag = [("yaml_path", None, "YAML file of settings: any of the options below as keys (e.g. config/defense/pam.yaml); "
                                     "flags win over it")]
    layers = []
    given = pre_parse(argv, yaml_flag).get("yaml_path")
    if given:
        path = resolve_path(given, script_dir, "settings YAML")
        layers.append((str(path), load_yaml(path, options)))
        given = str(path)
    shown = {k: v for _, layer in layers for k, v in layer.items()} if help_requested(argv) else None
    args = vars(build_parser(options, description, yaml_flag, shown).parse_args(argv))
    args.pop("yaml_path", None)
    cfg = resolve(options, layers, args)
    cfg["yaml_path"] = given
    return argparse.Namespace(**cfg)


def pre_parse(argv: Sequence[str] | None, yaml_flags: Sequence[tuple[str, Any, str]]) -> dict[str, Any]:
    """Only the YAML-path flags (their files are read before the full parser is built, so that
    --help can show what they set); everything else is left for the full parser."""
    pre = ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for flag, default, _ in yaml_flags:
        pre.add_argument(f"--{flag}", default=default)
    args = list(sys.argv[1:] if argv is None else argv)
    known, _ = pre.parse_known_args(args[: args.index("--")] if "--" in args else args)
    return vars(known)


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


class _PlainDumper(yaml.SafeDumper):
    """Never writes anchors and aliases (a value repeated in a config is written twice), so that
    what this toolkit writes, read_yaml reads back."""

    def ignore_aliases(self, data):
        return True


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.dump(cfg, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
