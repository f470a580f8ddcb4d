"""Command-line values as Python values: `adm train --set` and `adm book run -p`.

Hand-written tooling (not exported from a chapter): one converter, so that a
value typed on any command line means the same thing everywhere, and one way
to declare an option's default, choices and help with the dataclass field
that holds it (`option`; the `adm` command builds its flags from them). The
same converter reads settings back from a file (`settings_from_dict`), and
`check_types` and `check_rules` name the first setting whose value cannot be
(chapter 4's `TrainConfig` keeps its rules as data).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any, TypeVar

T = TypeVar("T")

# Seeds are whole numbers 0 <= seed <= MAX_SEED: torch's generators take
# 64-bit seeds, and numpy's SeedSequence (chapter 4's step_seed) takes no
# negative ones; chapter 6's per-sample seeds are reduced modulo 2**64. One
# range for every seed, of training (TrainConfig.seed) and of sampling
# (--seed), so that a seed one command takes, the others take too.
MAX_SEED = 2**64 - 1


def option(default: Any, help: str, **argument: Any) -> Any:
    """A dataclass field that is also a command-line option.

    `help` says what it is, `%(default)s` in it showing `default`;
    `argument` holds argparse's `metavar` and `choices`, and for a whole
    number `least` and `limit` (least <= n < limit), checked as it is read.
    """
    return field(default=default, metadata={"help": help, **argument})


def flag(name: str) -> str:
    """The command-line flag of option `name`: --name-like-this."""
    return "--" + name.replace("_", "-")


TRUE_WORDS = frozenset({"1", "true", "yes", "y", "t", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "f", "off"})


def coerce(raw: Any, default: Any) -> Any:
    """`raw` (often a string) as a value of `default`'s type, or ValueError.

    Booleans take the words of TRUE_WORDS and FALSE_WORDS; integers take
    integer-valued numbers such as "1e5"; floats take any number; strings
    take anything; tuples (of numbers) take numbers, comma-separated
    ("16,8", "(16, 8)", "" for none) or as a list; other defaults (lists,
    dicts, None) take a Python literal, and None also takes a plain string.
    """
    kind = type(default).__name__
    if isinstance(default, bool):
        text = str(raw).strip().lower()
        if text not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"expected bool ({', '.join(sorted(TRUE_WORDS))}"
                             f" or {', '.join(sorted(FALSE_WORDS))})")
        return text in TRUE_WORDS
    if isinstance(default, int | float):
        try:
            if isinstance(raw, bool):
                raise ValueError
            number = raw
            if isinstance(raw, str):  # int() first: float() rounds 2**63 - 1
                try:
                    number = int(raw)
                except ValueError:
                    number = float(raw)
            if isinstance(default, float):
                return float(number)
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ValueError(f"expected {kind}") from None
    if isinstance(default, str):
        return str(raw)
    if isinstance(default, tuple):
        return _numbers(raw, floats=bool(default) and all(
            isinstance(v, float) for v in default))
    if not isinstance(raw, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw
        raise ValueError(f"expected a {kind} literal") from None
    if default is not None and not isinstance(value, type(default)):
        raise ValueError(f"expected a {kind} literal")
    return value


def _numbers(raw: Any, floats: bool) -> tuple[int | float, ...]:
    """A tuple of numbers: floats if `floats`, else ints where whole."""
    if isinstance(raw, str):
        items: list[Any] = [w for w in raw.strip().strip("()[]").split(",")
                            if w.strip()]
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        items = [raw]
    try:
        numbers = [coerce(item, 0.0) for item in items]
    except ValueError:
        raise ValueError("expected numbers, comma-separated, such as "
                         "16,8") from None
    return tuple(n if floats or not n.is_integer() else int(n)
                 for n in numbers)


# A rule of `check_rules`: (fields, the test each value must pass, what the
# error adds after "name=value").
Rule = tuple[tuple[str, ...], Callable[[Any], bool], str]


def one_of(name: str, allowed: Sequence[Any]) -> Rule:
    """The rule that field `name` takes one of `allowed`."""
    return ((name,), allowed.__contains__,
            ": expected one of " + ", ".join(map(str, allowed)))


def check_rules(settings: Any, rules: Iterable[Rule],
                error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the first field of `settings` a rule refuses."""
    for names, ok, problem in rules:
        for name in names:
            if not ok(value := getattr(settings, name)):
                raise error(f"{name}={value!r}{problem}")


def check_types(settings: Any, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the first dataclass field of `settings` that
    does not hold its default's type (an int will do for a float; a tuple
    field takes a tuple of its annotated element type)."""
    for each in dataclasses.fields(settings):
        value, default = getattr(settings, each.name), each.default
        if isinstance(default, tuple):
            item = typing.get_args(each.type)[0]
            wanted = (int, float) if item is float else item
            if not (isinstance(value, tuple) and all(
                    isinstance(v, wanted) and not isinstance(v, bool)
                    for v in value)):
                raise error(f"{each.name}={value!r}: expected a tuple of "
                            f"{item.__name__}")
            continue
        wanted = (int, float) if type(default) is float else type(default)
        if (isinstance(value, bool) != isinstance(default, bool)
                or not isinstance(value, wanted)):
            raise error(f"{each.name}={value!r}: expected "
                        f"{type(default).__name__}")


def settings_from_dict(cls: type[T], settings: Mapping[str, Any],
                       error: type[Exception] = ValueError) -> T:
    """The dataclass `cls` of stored `settings`, each read by `coerce`."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise error(f"settings {', '.join(unknown)} are not fields of this "
                    f"adm_lib's {cls.__name__}")
    values = {}
    for key, value in settings.items():
        try:
            values[key] = coerce(value, defaults[key])
        except ValueError as err:
            raise error(f"stored setting {key}={value!r}: {err}") from None
    return cls(**values)


def coerce_settings(
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any],
    error: type[Exception] = ValueError,
) -> dict[str, Any]:
    """`overrides` converted by `coerce` to their `defaults`' types.

    Raises `error` naming a setting that is not in `defaults` (with the
    nearest names, for a typo) or a value that does not convert.
    """
    changes = {}
    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise error(
                f"unknown setting {key!r}{hint}; valid settings: " + ", ".join(defaults)
            )
        try:
            changes[key] = coerce(value, defaults[key])
        except ValueError as err:
            raise error(f"{key}={value!r}: {err}") from None
    return changes
