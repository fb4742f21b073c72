"""Dataclass configs become command-line interfaces.

Every field of a (possibly nested) dataclass becomes a flag: ``d_model`` -> ``--d-model``.
Booleans get ``--flag/--no-flag``. ``--preset NAME`` applies a named dict of overrides first;
flags given on the command line win over the preset. Unknown flags are an error (argparse's).
A renamed field keeps its old flag for one release: list it in the class's ``RENAMED`` (a ClassVar,
old name -> new name); the old flag still works, hidden from --help, and prints one deprecation line.

    @dataclass
    class TrainConfig:
        lr: float = 3e-4        # peak learning rate
    cfg = parse_config(TrainConfig, presets={"gpu4gb": {"batch_size": 64}})
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _flat_fields(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """All leaf fields of a dataclass as (path, field, type); nested dataclasses are flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _flat_fields(tp, prefix + (f.name,))
        else:
            out.append((prefix + (f.name,), f, tp))
    names = [p[-1] for p, _, _ in out]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise TypeError(f"{cls.__name__}: field names {sorted(clash)} appear twice after flattening")
    return out


def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in the class source (and its dataclass bases', where
    the subclass does not redefine the field): it becomes the --help text."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update({m.group(1): m.group(2).strip()
                         for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.MULTILINE)})
    return comments


def _scalar_type(tp):
    """The parser for one field's type (handles Optional[X] and Literal)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return _scalar_type(args[0])
    if origin is typing.Literal:
        return type(args[0])
    return tp


def build_parser(cls, presets: Mapping[str, Mapping[str, Any]] | None = None, description: str = ""):
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False,
                                     epilog="--debug: on an error, show the Python traceback instead of one "
                                            "'error:' line (or set TUTORIALS_DEBUG=1)")
    if presets:
        if "preset" in to_flat_dict(cls()):
            raise TypeError(f"{cls.__name__}: a field named 'preset' clashes with --preset")
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="named set of overrides applied before the other flags")
    defaults = to_flat_dict(cls())
    for path, f, tp in _flat_fields(cls):
        name = path[-1]
        flag = "--" + name.replace("_", "-")
        helptext = f.metadata.get("help") or _field_comments(_owner(cls, path)).get(name, "")
        helptext = helptext.replace("%", "%%")  # argparse formats help with %: "90% train" would crash --help
        if typing.get_origin(tp) is list:  # list[str] -> --flag a b c
            parser.add_argument(flag, dest=name, nargs="*", type=typing.get_args(tp)[0], default=defaults[name],
                                help=helptext or " ")
            continue
        tp = _scalar_type(tp)
        if tp is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=defaults[name], help=helptext)
        else:
            choices = None
            orig = typing.get_origin(typing.get_type_hints(_owner(cls, path))[name])
            if orig is typing.Literal:
                choices = list(typing.get_args(typing.get_type_hints(_owner(cls, path))[name]))
            parser.add_argument(flag, dest=name, type=tp, default=defaults[name], choices=choices,
                                help=helptext or " ")
    _add_renamed(parser, cls)
    return parser


def renamed_fields(cls) -> dict[str, str]:
    """Old leaf name -> new leaf name, from ``RENAMED`` of ``cls`` and of its nested dataclasses."""
    out = dict(getattr(cls, "RENAMED", {}))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(renamed_fields(hints[f.name]))
    known = {p[-1] for p, _, _ in _flat_fields(cls)}
    for old, new in out.items():
        if new not in known or old in known:
            raise TypeError(f"{cls.__name__}.RENAMED: {old!r} -> {new!r} must map a retired name to a field")
    return out


class _Renamed(argparse.Action):
    """An old flag: stores into the new field and says once, on stderr, what to write instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = ("--no-" if self.nargs == 0 and not self.const else "--") + self.dest.replace("_", "-")
        warned = parser.__dict__.setdefault("_renamed_warned", set())  # (--preset parses twice: warn once)
        if option_string not in warned:
            warned.add(option_string)
            print(f"warning: {option_string} is deprecated and will be removed in the next release; use {new}",
                  file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _add_renamed(parser: argparse.ArgumentParser, cls) -> None:
    fields_by_name = {p[-1]: tp for p, _, tp in _flat_fields(cls)}
    for old, new in renamed_fields(cls).items():
        tp = _scalar_type(fields_by_name[new])
        if tp is bool:  # --old and --no-old, both hidden
            for flag, value in ((old, True), ("no_" + old, False)):
                parser.add_argument("--" + flag.replace("_", "-"), dest=new, action=_Renamed, nargs=0,
                                    const=value, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
            continue
        kw = {"nargs": "*", "type": typing.get_args(fields_by_name[new])[0]} if typing.get_origin(
            fields_by_name[new]) is list else {"type": tp}
        parser.add_argument("--" + old.replace("_", "-"), dest=new, action=_Renamed, help=argparse.SUPPRESS,
                            default=argparse.SUPPRESS, **kw)


def _owner(cls, path):
    for p in path[:-1]:
        cls = typing.get_type_hints(cls)[p]
    return cls


def to_flat_dict(cfg) -> dict[str, Any]:
    """Leaf field name -> value, nested dataclasses flattened. A field that the config's __post_init__
    derived from others (listed in its ``_derived`` set) is given as its declared default (the sentinel,
    e.g. 0), so that rebuilding the config with other values derives it again."""
    out = {}
    derived = getattr(cfg, "_derived", ())
    for f in dataclasses.fields(cfg):
        v = f.default if f.name in derived else getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(to_flat_dict(v))
        else:
            out[f.name] = v
    return out


def from_flat_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build a (nested) dataclass from leaf values; unknown keys are an error."""
    known = {p[-1] for p, _, _ in _flat_fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
    return _build(cls, values)


def _build(cls, values):
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


def apply_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """A copy of ``cfg`` with some leaf fields replaced (used for presets and tests)."""
    flat = to_flat_dict(cfg)
    flat.update(overrides)
    return from_flat_dict(type(cfg), flat)


# The range of a field: written at the end of its comment, e.g. ``batch_size: int = 16  # per step (>= 1)``,
# or one of these defaults by field name (a comment's own range wins). Checked on every parsed config, presets
# included, so a bad value is one line naming the flag instead of a ZeroDivisionError deep in the loop.
RANGE_IN_COMMENT = re.compile(r"\((>=|>|<=|<) *(-?[0-9.]+(?:e-?[0-9]+)?)\)\s*$")
DEFAULT_RANGES = {
    "batch_size": (">=", 1), "grad_accum": (">=", 1), "eval_every": (">=", 1), "save_every": (">=", 1),
    "log_every": (">=", 1), "beam_size": (">=", 1), "num_beams": (">=", 1), "max_new_tokens": (">=", 1),
    "num_hidden_layers": (">=", 1), "num_attention_heads": (">=", 1), "hidden_size": (">=", 1),
    "lr": (">", 0), "max_iters": (">=", 0), "warmup_iters": (">=", 0), "threads": (">=", 0),
    "weight_decay": (">=", 0), "temperature": (">=", 0), "grad_clip": (">=", 0), "keep_checkpoints": (">=", 0),
}
_OPS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}


def field_ranges(cls) -> dict[str, tuple[str, float]]:
    """Leaf field name -> (operator, bound) for every numeric field that has a range."""
    out = {}
    for path, f, tp in _flat_fields(cls):
        name, tp = path[-1], _scalar_type(tp)
        if tp not in (int, float) or tp is bool:
            continue
        m = RANGE_IN_COMMENT.search(f.metadata.get("help") or _field_comments(_owner(cls, path)).get(name, ""))
        if m:
            out[name] = (m.group(1), float(m.group(2)))
        elif name in DEFAULT_RANGES:
            out[name] = DEFAULT_RANGES[name]
    return out


def check_ranges(cfg, from_preset: Mapping[str, str] | None = None) -> None:
    """Raise UserError naming the flag of the first value outside its range (``field_ranges``);
    ``from_preset``: field -> preset name, for values the user did not type."""
    from .errors import UserError

    values = to_flat_dict(cfg)
    for name, (op, bound) in field_ranges(type(cfg)).items():
        v = values[name]
        if isinstance(v, (int, float)) and not _OPS[op](v, bound):
            where = f" (the value of --preset {from_preset[name]})" if from_preset and name in from_preset else ""
            raise UserError(f"--{name.replace('_', '-')} {v}{where}: expected {op} {bound:g}")


def parse_config(cls: type[T], argv: Sequence[str] | None = None,
                 presets: Mapping[str, Mapping[str, Any]] | None = None) -> T:
    """Parse ``argv`` into ``cls``: defaults < preset < explicit flags."""
    parser = build_parser(cls, presets)
    args = parser.parse_args(argv)
    values = vars(args)
    preset = values.pop("preset", None) if presets else None
    if preset:
        # re-parse with the preset as the defaults, so explicit flags still win
        unknown = set(presets[preset]) - set(values)
        if unknown:
            raise ValueError(f"preset {preset!r} names unknown fields {sorted(unknown)}")
        parser.set_defaults(**presets[preset])
        values = vars(parser.parse_args(argv))
        values.pop("preset")
    cfg = from_flat_dict(cls, values)
    typed = {a.split("=")[0][2:].replace("-", "_") for a in (argv or []) if a.startswith("--")}
    check_ranges(cfg, {k: preset for k in presets[preset] if k not in typed} if preset else None)
    return cfg


def parse_no_flags(doc: str | None, argv: Sequence[str] | None = None) -> None:
    """For a command without options (a chapter's data fetcher): ``--help`` prints what it does (the first
    paragraph of ``doc``) and exits before any work; any other argument is an error."""
    argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
