"""Tolerance profiles: the example file is the built-in default; bad files name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ids_engine.adapt import Limit, default_tolerance, read_tolerance
from ids_engine.io import InputError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "adapt" / "tolerance_default.toml"


def test_example_file_is_the_builtin_default():
    p = read_tolerance(EXAMPLE)
    d = default_tolerance()
    assert p.kind_limits == d.kind_limits
    assert p.structure_limits == d.structure_limits == {}
    assert p.gamma_min_pass_pct == d.gamma_min_pass_pct == {"3%/3mm": 95.0, "2%/2mm": 90.0}
    assert p.low_dose_threshold_pct == 10.0 and p.max_fiducial_rms_mm == 2.0
    assert p.source == str(EXAMPLE)


def test_structure_limit_replaces_the_kinds(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text("[limits.oar]\nmean_pct_rx = 3\nmax_gy = 4\n[limits.structure.Rectum]\nmax_gy = 1.5\n")
    p = read_tolerance(f)
    assert p.limits_for("Rectum", "oar") == {"mean": Limit("mean", "pct_rx", 3.0), "max": Limit("max", "gy", 1.5)}
    assert p.limits_for("Bladder", "oar")["max"] == Limit("max", "gy", 4.0)
    assert p.limits_for("PTV", "target") == {}
    assert Limit("D95", "pct_rx", 3.0).delta_in_unit(-1.8, 60.0) == pytest.approx(-3.0)


@pytest.mark.parametrize("text, key, words", [
    ("[limits.target]\nD95_percent = 3\n", "limits.target.D95_percent", "unknown limit"),
    ("[limits.target]\nD95_pct_rx = -1\n", "limits.target.D95_pct_rx", "at least 0"),
    ("[limits.target]\nD95_pct_rx = 'three'\n", "limits.target.D95_pct_rx", "finite number"),
    ("[limits.target]\nD95_pct_rx = 3\nD95_gy = 1\n", "limits.target.D95_gy", "two limits on D95"),
    ("[limits.organ]\nmean_gy = 1\n", "limits.organ", "unknown structure kind"),
    ("[gamma]\nmin_pass_rate_3pct_3mm = 101\n", "gamma.min_pass_rate_3pct_3mm", "between 0 and 100"),
    ("[gamma]\nmin_pass_rate_1pct_1mm = 90\n", "gamma.min_pass_rate_1pct_1mm", "unknown key"),
    ("[registration]\nmax_rms = 1\n", "registration.max_rms", "unknown key"),
    ("tolerances = 3\n", "tolerances", "unknown key"),
    ("name = 'empty'\n", "limits", "nothing to qualify against"),
])
def test_bad_profiles_name_file_and_key(tmp_path, text, key, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(InputError) as exc:
        read_tolerance(f)
    assert exc.value.path == str(f) and exc.value.field == key
    assert words in str(exc.value)


def test_not_toml_and_missing_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[limits.target\n")
    with pytest.raises(InputError, match="not valid TOML"):
        read_tolerance(f)
    with pytest.raises(InputError, match="cannot read"):
        read_tolerance(tmp_path / "missing.toml")
