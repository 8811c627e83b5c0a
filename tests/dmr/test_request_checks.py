"""Bad requests are a RequestError naming the field and the plain value, never a raw
ValueError, TypeError, IndexError, KeyError or OverflowError, and never change the plan."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr import (
    EraseSpot,
    MoveIsodoseLine,
    MoveIsodoseSurface,
    Pin,
    RequestError,
    SetVoxelDose,
    Unpin,
    request_from_dict,
)

NAN = float("nan")

# (constructor, text the message must hold). Made on construction: no session needed.
MALFORMED = {
    "index too short": (lambda: SetVoxelDose((1, 2), 30.0), "SetVoxelDose.index_zyx must be 3 integers, got [1, 2]"),
    "index a string": (lambda: SetVoxelDose("abc", 30.0), "index_zyx must be 3 integers, got 'abc'"),
    "index a fraction": (lambda: SetVoxelDose((21, 22, 40.5), 30.0), "got [21, 22, 40.5]"),
    "index NaN": (lambda: SetVoxelDose((NAN, 22, 40), 30.0), "finite"),
    "dose NaN": (lambda: SetVoxelDose((1, 2, 3), np.float64(NAN)), "dose_gy must be a finite number, got nan"),
    "dose a string": (lambda: SetVoxelDose((1, 2, 3), "30"), "dose_gy must be a finite number, got '30'"),
    "dose negative": (lambda: SetVoxelDose((1, 2, 3), np.float64(-5.0)), "dose_gy must be non-negative, got -5"),
    "slice a string": (lambda: MoveIsodoseLine("z", "a", 57.0, (1, 2), (3, 4)), "slice_index must be an integer, got 'a'"),
    "drag point too long": (lambda: MoveIsodoseLine("z", 3, 57.0, (1, 2, 3), (3, 4)), "start_rc must be 2 numbers"),
    "width negative": (lambda: MoveIsodoseLine("z", 3, 57.0, (1, 2), (3, 4), width_mm=-6), "width_mm must be positive, got -6"),
    "level infinite": (lambda: MoveIsodoseSurface(float("inf"), (1, 2, 3), (2, 3, 4)), "level_gy must be a finite number"),
    "surface point short": (lambda: MoveIsodoseSurface(57.0, (1, 2), (2, 3, 4)), "start_zyx must be 3 numbers"),
    "radius zero": (lambda: Pin("p", (1, 2, 3), np.float64(0.0)), "Pin.radius_mm must be positive, got 0"),
    "radius absurd": (lambda: Pin("p", (1, 2, 3), 1e300), "radius_mm must be at most"),
    "centre absurd": (lambda: EraseSpot((1e300, 0, 0), 5.0, 50.0, 60.0), "centre_zyx must be at most"),
    "centre NaN": (lambda: EraseSpot((NAN, 0, 0), 5.0, 50.0, 60.0), "centre_zyx must be 3 finite numbers"),
    "structure not a name": (lambda: EraseSpot((1, 2, 3), 5.0, 50.0, 60.0, structure=3), "structure must be a structure name"),
    "pin name empty": (lambda: Pin("", (1, 2, 3), 4.0), "Pin.name must be a non-empty name"),
    "unpin name not a string": (lambda: Unpin(None), "Unpin.name must be a non-empty name, got None"),
    "unknown field": (lambda: request_from_dict({"kind": "set_voxel_dose", "index_zyx": [1, 2, 3], "dose_gy": 3, "x": 1}),
                      "unknown field 'x' for a set_voxel_dose request; expected: index_zyx, dose_gy"),
    "missing field": (lambda: request_from_dict({"kind": "pin", "name": "p"}), "a pin request needs the fields 'centre_zyx', 'radius_mm'"),
    "kind unhashable": (lambda: request_from_dict({"kind": ["pin"]}), "unknown request kind ['pin']"),
    "not a dict": (lambda: request_from_dict([1, 2]), "a request is an object with a 'kind'"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_names_field_and_plain_value(name):
    make, text = MALFORMED[name]
    with pytest.raises(RequestError) as info:
        make()
    msg = str(info.value)
    assert text in msg
    assert "np.float64" not in msg and "__init__()" not in msg


def test_field_errors_carry_field_and_rule():
    with pytest.raises(RequestError) as info:
        MoveIsodoseLine("z", 2.5, 57.0, (1, 2), (3, 4))
    assert (info.value.field, info.value.rule) == ("slice_index", "must be an integer")


def test_valid_values_are_normalised_to_plain_python():
    r = SetVoxelDose(np.array([21, 22, 40]), np.float32(30.0))
    assert r.index_zyx == (21, 22, 40) and type(r.index_zyx[0]) is int and type(r.dose_gy) is float
    line = MoveIsodoseLine("z", np.int64(3), 57, [1, 2], (3.0, 4))
    assert line.slice_index == 3 and line.start_rc == (1.0, 2.0) and line.level_gy == 57.0
    assert request_from_dict({"kind": "pin", "name": "p", "centre_zyx": [1, 2, 3], "radius_mm": 4}) == Pin("p", (1, 2, 3), 4)


# Requests well formed but impossible on this session, and bad run() options: RequestError,
# the plan and journal untouched.
IMPOSSIBLE = {
    "index outside the grid": (lambda: SetVoxelDose((10_000, 0, 0), 30.0), {}, "outside the grid"),
    "negative index": (lambda: SetVoxelDose((-1, 0, 0), 30.0), {}, "outside the grid"),
    "slice outside the grid": (lambda: MoveIsodoseLine("y", 999, 57.0, (21, 40), (20, 40)), {}, "slice_index 999 outside"),
    "drag start far off the grid": (lambda: MoveIsodoseLine("z", 21, 57.0, (1e5, 40), (22, 40)), {}, ""),
    "unknown structure": (lambda: EraseSpot((21, 30, 40), 6.0, 57.0, 64.0, structure="NOPE"), {}, "no structure called 'NOPE'"),
    "pin far off the grid": (lambda: Pin("far", (1e5, 0, 0), 3.0), {}, "outside the body"),
    "unknown pin": (lambda: Unpin("nothing"), {}, "no pin called 'nothing'"),
    "not a request": (lambda: {"kind": "set_voxel_dose"}, {}, "not a dose shaping request: a dict"),
    "recovery steps a string": (lambda: SetVoxelDose((21, 22, 40), 30.0), {"recovery_steps": "x"},
                                "recovery_steps must be an integer, got 'x'"),
    "recovery steps negative": (lambda: SetVoxelDose((21, 22, 40), 30.0), {"recovery_steps": -1}, "got -1"),
    "max voxels zero": (lambda: SetVoxelDose((21, 22, 40), 30.0), {"max_voxels": 0}, "max_voxels must be 1 or more"),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_impossible_request_is_a_request_error_and_leaves_the_plan(name, shaping_session):
    make, kwargs, text = IMPOSSIBLE[name]
    s = shaping_session
    d = s.dose()
    n = len(s.journal)
    with pytest.raises(RequestError, match=text or None):
        s.run(make(), **kwargs)
    assert len(s.journal) == n
    np.testing.assert_array_equal(s.dose(), d)
