"""adm_lib.values: the one converter of command-line values, options that
are dataclass fields and flags at once, the rules a setting's value must
pass, and settings read back from a file."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from adm_lib.values import (
    check_rules,
    coerce,
    coerce_settings,
    one_of,
    settings_from_dict,
)


@dataclass
class Settings:
    """A stand-in for a configuration: a number, a choice and a tuple."""

    steps: int = 10
    kind: str = "a"
    rates: tuple[float, ...] = (0.5,)


@pytest.mark.parametrize(("raw", "default", "value"), [
    ("yes", False, True), ("Off", True, False), ("1e5", 3, 100000),
    (4.0, 3, 4), ("7", 0.5, 7.0), (7, "x", "7"), ("[1, 2]", [0], [1, 2]),
    ("{'a': 1}", {}, {"a": 1}), ("runs/a", None, "runs/a"), ("3", None, 3),
])
def test_one_converter_for_every_command_line(raw, default, value) -> None:
    assert coerce(raw, default) == value
    assert type(coerce(raw, default)) is type(value)


@pytest.mark.parametrize(("raw", "default"), [
    ("maybe", False), ("1.5", 3), ("True", 3), (True, 0.5), ("ten", 1.0),
    ("[1", [0]), ("{}", [0]),
])
def test_the_converter_refuses_what_is_not_of_the_type(raw, default) -> None:
    with pytest.raises(ValueError, match="expected"):
        coerce(raw, default)


@pytest.mark.parametrize(("raw", "default", "value"), [
    ("1,2,2", (1,), (1, 2, 2)), ("(16, 8)", (8,), (16, 8)), ("", (8,), ()),
    ("8", (8,), (8,)), ([0.5, 1], (1,), (0.5, 1)), (8, (8,), (8,)),
    ("0.95", (0.9999,), (0.95,)), ("1", (0.9999,), (1.0,)),
])
def test_tuples_take_numbers_comma_separated(raw, default, value) -> None:
    # A tuple of floats stays floats; other tuples keep whole numbers ints
    # (channel_mult may hold 0.5).
    assert coerce(raw, default) == value
    assert [type(v) for v in coerce(raw, default)] == [type(v) for v in value]


@pytest.mark.parametrize("raw", ["a,b", "1,,x", "True", [True], "nan,1x"])
def test_tuples_refuse_what_is_not_numbers(raw) -> None:
    with pytest.raises(ValueError, match="expected numbers, comma-separated"):
        coerce(raw, (1,))


def test_settings_are_coerced_and_a_typo_gets_the_nearest_names() -> None:
    defaults = {"steps": 10, "lr": 1e-4, "learn_sigma": True}
    assert coerce_settings({"steps": "5", "lr": "2e-3"}, defaults) == {
        "steps": 5, "lr": 2e-3}
    with pytest.raises(KeyError, match=r"unknown setting 'step' \(did you "
                       r"mean steps\?\); valid settings: steps, lr, "):
        coerce_settings({"step": 5}, defaults, KeyError)
    with pytest.raises(ValueError, match="^learn_sigma='maybe': expected "
                       "bool"):
        coerce_settings({"learn_sigma": "maybe"}, defaults)


RULES = (one_of("kind", ("a", "b")),
         (("steps",), lambda v: v >= 1, " must be >= 1"),
         (("rates",), lambda v: all(0 < r < 1 for r in v), " out of (0, 1)"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"kind": "c"}, "kind='c': expected one of a, b"),
    ({"steps": 0}, "steps=0 must be >= 1"),
    ({"rates": (0.5, 1.0)}, "rates=(0.5, 1.0) out of (0, 1)"),
    # Two faults: the first rule's field is named.
    ({"kind": "c", "steps": 0}, "kind='c'"),
])
def test_rules_name_the_first_field_that_breaks_one(changes, message) -> None:
    with pytest.raises(KeyError, match=re.escape(message)):
        check_rules(Settings(**changes), RULES, KeyError)
    check_rules(Settings(), RULES, KeyError)  # the defaults pass


def test_stored_settings_read_old_strings_and_name_what_does_not_fit() -> None:
    read = settings_from_dict(Settings, {"steps": "1e3", "rates": "0.9,0.99"})
    assert read == Settings(steps=1000, rates=(0.9, 0.99))
    assert type(read.steps) is int
    with pytest.raises(KeyError, match="settings lr, seed are not fields of "
                       "this adm_lib's Settings"):
        settings_from_dict(Settings, {"seed": 1, "lr": 1, "steps": 3}, KeyError)
    with pytest.raises(KeyError, match="stored setting steps='ten': "
                       "expected int"):
        settings_from_dict(Settings, {"steps": "ten"}, KeyError)
