"""Command lines read strictly against the settings' declarations, before any work is done.

The syntax is fire's, so existing command lines keep working: `--name value`, `--name=value`,
`--flag` / `--noflag` for switches, `-` or `_` inside names, and positional values in the
command's order. Unlike fire, an unknown flag is refused before anything runs (naming the
nearest valid one), values are read by the setting's declared type (`--run_name 7` stays
text, `--prefix "[1]"` is not a list), text flags understand the escapes users type (`\\n`,
`\\t`), and `--help` is one plain line per flag with its real default.
"""

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Callable

from gpt2tf.errors import FieldError
from gpt2tf.settings import REQUIRED, Setting

HELP = ("-h", "--help")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
_ESCAPE = re.compile(r"\\([ntr0\\])")


class UsageError(Exception):
    """The command line itself is wrong (an unknown flag, a missing value): exit status 2."""


class ShowHelp(Exception):
    """--help was asked for."""


@dataclass(frozen=True)
class Command:
    """One script or verb: its settings (the flags), which of them may be given by position,
    what it does, and the function that does it (called with every setting by name)."""

    name: str
    run: Callable[..., None]
    settings: tuple[Setting, ...]
    summary: str
    positional: tuple[str, ...] = ()
    notes: str = ""
    # Flags given explicitly, passed on as `given=` (train resumes a run from its stored config
    # for the flags left out, so it must know which ones were typed).
    wants_given: bool = False
    subcommands: dict = field(default_factory=dict)

    def setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r`, `\\0` and `\\\\` as typed on a command line -> the characters."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def read_value(s: Setting, raw: str):
    """A flag's text -> a value of the setting's type (FieldError when it is not one)."""
    if s.optional and raw in ("None", "none"):
        return None
    if s.type is bool:
        low = raw.lower()
        if low in TRUE or low in FALSE:
            return low in TRUE
        raise FieldError(s.name, f"is a switch: give --{s.name} or --no{s.name}, got {raw!r}")
    if s.type is int:
        if re.fullmatch(r"[+-]?\d+", raw.strip()):
            return int(raw)
        if s.also_str:
            return raw
        raise FieldError(s.name, f"must be an integer, got {raw!r}")
    if s.type is float:
        try:
            return float(raw)
        except ValueError:
            raise FieldError(s.name, f"must be a number, got {raw!r}") from None
    if s.type is tuple:  # a JSON list, or texts separated by |
        if raw.lstrip().startswith("["):
            return _json(s, raw, list)
        return [unescape(x) if s.text else x for x in raw.split("|") if x]
    if s.type is dict:
        return _json(s, raw, dict)
    return unescape(raw) if s.text else raw


def _json(s: Setting, raw: str, kind: type):
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        example = '\'["one", " two"]\'' if kind is list else '\'{"50256": -100}\''
        raise FieldError(s.name, f"must be a JSON {'list' if kind is list else 'object'} such"
                         f" as {example}, got {raw!r}")
    return value


def _nearest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean --{close[0]}?" if close else ""


def parse(command: Command, argv: list[str]) -> tuple[dict, set[str]]:
    """Every setting's value (given or default) and the names given; UsageError, ShowHelp or
    FieldError on a bad command line."""
    names = [s.name for s in command.settings]
    given: dict = {}
    positional: list[str] = []
    i = 0
    only_positional = False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if only_positional or not arg.startswith("-") or _is_number(arg) or arg == "-":
            positional.append(arg)
            continue
        if arg in HELP:
            raise ShowHelp
        if arg == "--":
            only_positional = True
            continue
        if not arg.startswith("--"):
            raise UsageError(f"unknown flag {arg}{_nearest(arg.lstrip('-'), names)}"
                             " (flags are spelled --name)")
        name, eq, raw = arg[2:].partition("=")
        name = name.replace("-", "_")
        s = command.setting(name)
        if s is None and name.startswith("no") and not eq:
            off = command.setting(name[2:])
            if off is not None and off.type is bool:
                _put(given, off.name, False)
                continue
        if s is None:
            raise UsageError(f"unknown flag --{name}{_nearest(name, names)}")
        if s.type is bool and not eq:
            if i < len(argv) and argv[i].lower() in TRUE + FALSE:
                raw, i = argv[i], i + 1
            else:
                raw = "true"
        elif not eq:
            if i >= len(argv):
                raise UsageError(f"--{name} needs a value")
            raw, i = argv[i], i + 1
        _put(given, name, read_value(s, raw))
    free = [n for n in command.positional if n not in given]
    if len(positional) > len(free):
        extra = positional[len(free)]
        hint = (f" (it takes {', '.join(n.upper() for n in command.positional)} by position)"
                if command.positional else " (this command takes flags only)")
        raise UsageError(f"unexpected argument {extra!r}{hint}")
    for name, raw in zip(free, positional):
        _put(given, name, read_value(command.setting(name), raw))
    missing = [s.name for s in command.settings if s.default is REQUIRED and s.name not in given]
    if missing:
        how = "give it as --{0} or by position" if missing[0] in command.positional else "--{0}"
        raise UsageError(f"missing {missing[0]}: {how.format(missing[0])}")
    values = {s.name: s.default for s in command.settings}
    values.update(given)
    return values, set(given)


def _put(given: dict, name: str, value) -> None:
    given[name] = value  # as with fire, a flag given again overrides the earlier one


def _is_number(arg: str) -> bool:
    return bool(re.fullmatch(r"-\d[\d.e+-]*|-\.\d[\d.e+-]*|-inf|-nan", arg))


def help_text(command: Command, prog: str) -> str:
    """Usage, summary, and one line per flag: what it does and its default."""
    pos = " ".join(n.upper() for n in command.positional)
    lines = [f"usage: {prog} {pos + ' ' if pos else ''}[flags]", "", command.summary.strip()]
    if command.notes:
        lines += ["", command.notes.strip()]
    lines += ["", "flags:"]
    width = max(len(_flag(s)) for s in command.settings) + 2
    for s in command.settings:
        lines.append(f"  {_flag(s).ljust(width)}{s.help}{_default(s)}")
    return "\n".join(lines) + "\n"


def _flag(s: Setting) -> str:
    if s.type is bool:
        return f"--[no]{s.name}"
    kind = s.metavar or {int: "N", float: "X"}.get(s.type, "TEXT")
    return f"--{s.name} {kind}"


def _default(s: Setting) -> str:
    if s.default is REQUIRED:
        return " (required)"
    if s.default is None or s.default == ():
        return ""
    if isinstance(s.default, str):
        return f" (default: {s.default!r})" if s.text or s.default == "" else \
            f" (default: {s.default})"
    if isinstance(s.default, bool):
        return f" (default: {'on' if s.default else 'off'})"
    return f" (default: {s.default})"
