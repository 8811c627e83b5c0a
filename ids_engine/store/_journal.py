"""Reading a session folder's journal for the store's index (no engine, no replay).

A session folder (see :class:`ids_engine.session.Session`) holds ``session.json``,
``initial_fluences.npz``, ``requests/r<id>.npz`` and ``journal.jsonl``. The store indexes the
complete lines of the journal (a line is complete once its newline is on disk; the session
fsyncs each line after the request file it names), so the index never runs ahead of what
a replay would apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ids_engine._files import file_mode, fsync_folder

SESSION_FILES = ("session.json", "initial_fluences.npz", "journal.jsonl")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class JournalLine:
    """One complete journal line: where it ends in the file, what it is, the file it names."""

    line: int          # 0-based line number
    end_bytes: int     # byte offset just past its newline
    op: str            # "request", "undo", "redo", "clear_redo"
    session_plan_id: int
    request_id: int | None
    kind: str | None
    patches: int
    file: str | None
    summary: dict | None


def complete_journal(folder: Path) -> bytes:
    """The journal's complete lines (a torn tail, the operation in flight, is left out)."""
    raw = (folder / "journal.jsonl").read_bytes()
    return raw[: raw.rfind(b"\n") + 1]


def parse_lines(raw: bytes, start_bytes: int, first_line: int) -> list[JournalLine]:
    """Parse the complete lines of ``raw`` from ``start_bytes`` on; stops at the first line
    that is not a valid journal entry (as the session's replay does)."""
    out = []
    pos, n = start_bytes, first_line
    while pos < len(raw):
        end = raw.index(b"\n", pos) + 1
        try:
            entry = json.loads(raw[pos:end])
            op = entry["op"]
            if op not in ("request", "undo", "redo", "clear_redo"):
                break
            summ = entry.get("summary") if op == "request" else None
            req = (summ or {}).get("request") or {}
            out.append(JournalLine(n, end, op, int(entry.get("plan_id", 0)),
                                   int(summ["id"]) if summ else None, req.get("kind") if summ else None,
                                   int((summ or {}).get("patches", 0)), entry.get("file") if op == "request" else None,
                                   summ))
        except (ValueError, KeyError, TypeError, AttributeError):
            break
        pos, n = end, n + 1
    return out


def copy_file_durably(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (a new file) and fsync it."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, _CHUNK)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, file_mode())


def write_bytes_durably(dst: Path, data: bytes) -> None:
    with open(dst, "wb") as fo:
        fo.write(data)
        fo.flush()
        os.fsync(fo.fileno())
    os.chmod(dst, file_mode())


def copy_session_folder(src: Path, dst: Path) -> bytes:
    """Copy a session folder's files into the new folder ``dst`` (created), durably.

    Only the journal's complete lines are copied (a live writer's line in flight is not),
    and of the request files those the copied lines name plus any earlier ones. The lock
    file is not copied. Returns the copied journal bytes.
    """
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "requests").mkdir(exist_ok=True)
    journal = complete_journal(src)  # read first: every file it names is on disk already
    for name in ("session.json", "initial_fluences.npz"):
        copy_file_durably(src / name, dst / name)
    for line in parse_lines(journal, 0, 0):
        if line.file:
            copy_file_durably(src / "requests" / line.file, dst / "requests" / line.file)
    for extra in sorted(src.glob("journal-damaged-*.jsonl")):
        copy_file_durably(extra, dst / extra.name)
    write_bytes_durably(dst / "journal.jsonl", journal)
    fsync_folder(dst / "requests")
    fsync_folder(dst)
    return journal


def is_session_folder(folder: Path) -> bool:
    return all((folder / n).is_file() for n in SESSION_FILES)
