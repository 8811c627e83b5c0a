"""``ids store``: init, import-session, list, show, history, copy, approve, status, delete,
check, export-anonymised, and its errors."""

from __future__ import annotations

import json

import pytest

from ids_engine.cli import main
from ids_engine.dmr import SetVoxelDose
from tests.store.conftest import RX, target_voxel


@pytest.fixture
def saved(session, tmp_path):
    session.run(SetVoxelDose(target_voxel(session, 0), 0.9 * RX), recovery_steps=2)
    session.save(tmp_path / "shaped")
    session.close()
    return tmp_path / "shaped"


def test_ids_store_commands_from_import_to_export(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IDS_STORE", str(tmp_path / "st"))
    assert main(["store", "init"]) == 0
    assert f"plan store at {tmp_path / 'st'} (0 plans)" in capsys.readouterr().out
    assert main(["store", "import-session", str(saved), "--plan", "A", "--patient-id", "PID-9",
                 "--patient-name", "Roe^Richard"]) == 0
    assert "imported as plan 'A' (plan ID 2, draft) (1 requests" in capsys.readouterr().out
    assert main(["store", "--user", "alice", "copy", "A", "B"]) == 0
    assert "copied to plan 'B' (plan ID 2, draft)" in capsys.readouterr().out
    assert main(["store", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["plan", "plan", "ID"] and "PID-9" not in out
    assert [ln.split()[0] for ln in out.splitlines()[1:]] == ["A", "B"]
    assert main(["store", "list", "--patients"]) == 0
    assert "PID-9" in capsys.readouterr().out
    assert main(["store", "approve", "B", "--user", "dr. bob"]) == 0
    assert "plan 'B' (plan ID 2, approved) approved by dr. bob at " in capsys.readouterr().out
    assert main(["store", "show", "B", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "approved" and doc["parent"] == "A" and len(doc["beams"]) == 2
    assert main(["store", "history", "A"]) == 0
    out = capsys.readouterr().out
    assert "set_voxel_dose" in out and "import session" in out
    assert main(["store", "status", "A", "for-review"]) == 0
    assert "plan 'A' (plan ID 2, for-review)" in capsys.readouterr().out
    assert main(["store", "check", "--replay"]) == 0
    assert "sound (2 plans)" in capsys.readouterr().out
    assert main(["store", "export-anonymised", str(tmp_path / "anon")]) == 0
    assert (tmp_path / "anon" / "store.sqlite").is_file()
    capsys.readouterr()
    # Errors: exit 2 with a message naming the plan, the file or the folder.
    assert main(["store", "delete", "B"]) == 2
    assert "error: plan 'B' is approved; delete it with force=True" in capsys.readouterr().err
    assert main(["store", "delete", "B", "--force"]) == 0
    capsys.readouterr()
    assert main(["store", "copy", "nope", "C"]) == 2
    assert "error: no plan 'nope' in the store" in capsys.readouterr().err
    assert main(["store", "export-anonymised", str(tmp_path / "anon")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["store", "--store", str(saved), "list"]) == 2
    assert f"error: {saved}: not an ids-engine plan store" in capsys.readouterr().err
    assert main(["store", "import-session", str(tmp_path), "--plan", "X", "--patient-id", "P"]) == 2
    assert "error:" in capsys.readouterr().err
