"""Operating-point knobs: type-checked Config overrides with errors that name the knob."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from catalog import knobs


@dataclass
class Cfg:
    threshold: float = 0.5
    blocks: int = 3
    hard: bool = True
    mode: Literal["a", "b"] = "a"
    widths: tuple[float, ...] = (0.25, 1.0)
    name: str = "x"
    k: int | None = None


def test_assignments_parse_yaml_scalars():
    assert knobs.parse_assignments(["threshold=0.3", "hard=false", "widths=[0.5, 1]", "name=abc"]) == {
        "threshold": 0.3, "hard": False, "widths": [0.5, 1], "name": "abc"}


def test_apply_coerces_and_keeps_defaults():
    cfg = knobs.apply(Cfg, {"threshold": 1, "widths": [0.5, 1], "k": 2})
    assert cfg.threshold == 1.0 and isinstance(cfg.threshold, float)
    assert cfg.widths == (0.5, 1.0) and cfg.k == 2 and cfg.blocks == 3


def test_apply_on_top_of_a_base_config():
    base = knobs.apply(Cfg, {"blocks": 5})
    assert knobs.apply(Cfg, {"threshold": 0.1}, base=base).blocks == 5


@pytest.mark.parametrize("overrides, message", [
    ({"treshold": 0.1}, "treshold: unknown knob; known: threshold, blocks"),
    ({"threshold": "abc"}, "threshold: expected a number, got 'abc'"),
    ({"blocks": 2.5}, "blocks: expected an integer, got 2.5"),
    ({"hard": "yes"}, "hard: expected true or false"),
    ({"mode": "c"}, "mode: expected one of 'a', 'b'"),
    ({"widths": ["x"]}, "widths[0]: expected a number"),
    ({"k": "two"}, "k: expected"),
])
def test_bad_values_name_the_knob(overrides, message):
    with pytest.raises(knobs.KnobError, match=None) as err:
        knobs.apply(Cfg, overrides)
    assert message in str(err.value)


def test_assignment_without_equals_is_rejected():
    with pytest.raises(knobs.KnobError, match="expected key=value"):
        knobs.parse_assignments(["threshold"])


def test_as_dict_is_json_friendly():
    assert knobs.as_dict(Cfg())["widths"] == [0.25, 1.0]
