"""The plan store: patients, image sets, structure sets, plans, their shaping history,
approvals, evidence and an audit trail in one folder (SQLite index + session folders + arrays).

Layout of a store folder::

    ids-store.json             marker: format and version (written last when a store is created)
    store.sqlite               the index (WAL mode): every table of ``_schema.py``
    patients/<patient>/<image set>/ct_hu.npy, structures.npz
    plans/<plan>/session/      the plan's session folder, in the session's own crash-safe
                               journal format (session.json, initial_fluences.npz,
                               requests/r<id>.npz, journal.jsonl, .lock)
    plans/<plan>/files/        files that came with the plan (protocol.toml, plan.json)
    plans/<plan>/evidence/<e>/ doc.json (+ arrays.npz): e.g. an adaptation's comparison report
    .staging/, .trash/         work folders of operations in flight

Design (why the journal stays the source of truth)
---------------------------------------------------
A plan's history *is* its session journal: the session appends a request's file, fsyncs it,
then appends and fsyncs the journal line (see :class:`ids_engine.session.Session`). SQLite
indexes the journal's complete lines (ops, request ids and kinds, the request files'
SHA-256, the store's plan ID after each line and, when the writing session is at hand, the
SHA-256 of its fluences and dose). The index is derived data: a crash between a journal
append and its index transaction loses nothing, the next sync indexes the line (a sync is
idempotent and checks that the indexed prefix of the journal is unchanged, re-indexing when
it is not). A session opened through :meth:`PlanStore.load_session` indexes each operation as
it is journaled. A session stored with :meth:`PlanStore.save_session` is written with its
whole history and checked by one replay, so the stored plan replays bit for bit to what
the session shows (see there).

Every other write is a file step made durable first and a single SQLite transaction that
makes it visible: an import, a save or a copy builds the new plan folder under ``.staging/``
(locked), renames it into ``plans/`` and then commits the plan's rows (plan, beams, indexed
requests, audit entry) in one transaction. A crash before the commit leaves an unindexed
folder with a free lock, which the next writer to open the store removes; a crash after it
leaves a complete plan. Deletion commits first and removes the folder after (a leftover
folder is swept the same way). Evidence files are written under a fresh name before their
row is committed. So after ``kill -9`` at any moment the store opens, passes :meth:`check`,
and at most the operation in flight is lost.

Rules the store keeps
---------------------
* One writer per plan: a plan opened for writing holds its session folder's lock; a second
  writer (any process) gets :class:`PlanOpenElsewhereError` naming pid, host and since when.
  Readers (listing, history, read-only sessions, export) never wait for it (SQLite WAL).
* The store's plan ID increments on each dose-affecting change (a request with fluence
  patches, the undo or redo of one, a new starting plan); renaming and copying keep it.
* An approval records who, when, the plan ID and the plan's content hash (SHA-256 of its
  beams, prescription and fluence maps). **An approved plan is never changed in place**:
  opening it for writing raises :class:`ApprovedPlanError` (the message says to copy it);
  :meth:`PlanStore.load_session` opens it read-only by default, and changes go to a copy
  (:meth:`PlanStore.copy_plan`, or :meth:`PlanStore.save_session` of the changed session),
  which starts unapproved. Any dose-affecting change of a plan resets its status to "draft".
* Patient identifiers (patient ID, name) live only in the ``patients`` table; everything
  else refers to a random patient key. Logs and the audit trail never contain identifiers
  or input paths. :meth:`PlanStore.export_anonymised` writes a copy with identifiers (and
  users) replaced by pseudonyms and input paths removed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ids_engine._files import FolderLock, FolderLockedError, atomic_npz, atomic_text, file_mode, fsync_folder

from ._journal import (
    complete_journal,
    copy_file_durably,
    copy_session_folder,
    is_session_folder,
    parse_lines,
    sha256_bytes,
    sha256_file,
)
from ._schema import FORMAT, SCHEMA, SCHEMA_VERSION

__all__ = ["ApprovedPlanError", "NotAStoreError", "PlanNotFoundError", "PlanOpenElsewhereError", "PlanRef",
           "PlanStore", "STATUSES", "StoreError", "StoreIntegrityError", "content_hash", "default_store_path",
           "dose_hash"]

_log = logging.getLogger(__name__)

MARKER = "ids-store.json"
DB_NAME = "store.sqlite"
# Statuses a plan can be set to (approval only through PlanStore.approve).
STATUSES = ("draft", "for-review", "auto-qualified", "rejected", "retired")
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_PLAN_EXTRA_FILES = ("protocol.toml", "plan.json")


class StoreError(ValueError):
    """A store operation that cannot be done, or a store file that cannot be read (names it)."""


class NotAStoreError(StoreError):
    """The folder is not an ids-engine plan store."""


class PlanNotFoundError(StoreError, KeyError):
    """No plan of that name or key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ApprovedPlanError(StoreError):
    """An approved plan is never changed in place: copy it and change the copy."""


class StoreIntegrityError(StoreError):
    """The store's index and its files disagree (names each problem)."""


class PlanOpenElsewhereError(FolderLockedError):
    """Another writer (this or another process) has the plan open."""


def default_store_path() -> Path:
    """``$IDS_STORE``, else ``$XDG_DATA_HOME/ids-engine/store`` (``~/.local/share/...``)."""
    env = os.environ.get("IDS_STORE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ids-engine" / "store"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def content_hash(session) -> str:
    """SHA-256 of a session's plan content: beams, prescription and fluence maps (float32)."""
    from ids_engine.session import _beam_to_dict

    h = hashlib.sha256()
    h.update(json.dumps({"beams": [_beam_to_dict(g.beam) for g in session.engine.geometry],
                         "prescription_gy": float(session.prescription_gy)}, sort_keys=True).encode())
    for f in session.engine.fluences_host():
        a = np.ascontiguousarray(f, np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dose_hash(session) -> str:
    """SHA-256 of a session's dose cube (float32, (z, y, x), Gy)."""
    return hashlib.sha256(np.ascontiguousarray(session.dose(), np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class PlanRef:
    """A plan in a store, as listed (a snapshot; the store's row may have moved on).

    key : the plan's store key (stable); name : unique per patient; plan_id : the store's
    plan ID; status : "draft", "approved", "auto-qualified", ...; n_requests : requests in
    its indexed history; parent_key : the plan it was copied or adapted from.
    """

    key: str
    patient_key: str
    name: str
    plan_id: int
    status: str
    n_requests: int = 0
    parent_key: str | None = None
    created: str = ""
    modified: str = ""
    content_sha256: str | None = None

    def __str__(self) -> str:
        return f"plan {self.name!r} (plan ID {self.plan_id}, {self.status})"


def _lock_holder(folder: Path) -> str:
    lock = folder / FolderLock.NAME
    try:
        text = lock.read_text(encoding="utf-8").split()
        since = _dt.datetime.fromtimestamp(lock.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return "another process"
    if len(text) >= 2:
        return f"pid {text[0]}, host {text[1]}, since {since.replace('+00:00', 'Z')}"
    return f"another process, since {since}"


class PlanStore:
    """A plan store folder. Open it with :meth:`open` (a context manager).

    Safe for several processes: any number of readers, one writer per plan, SQLite
    serialising the index transactions. One ``PlanStore`` object may be shared by threads.
    """

    def __init__(self, root: Path, conn: sqlite3.Connection, user: str) -> None:
        self.root = root
        self.user = user
        self._conn = conn
        self._lock = threading.RLock()
        self._closed = False
        self._open_sessions: dict[str, weakref.ref] = {}  # plan key -> the session this store opened for writing
        self._sha_cache: dict[Path, tuple] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: "str | Path | None" = None, *, user: str | None = None, create: bool = True) -> "PlanStore":
        """Open (or, with ``create``, create) the store at ``path`` (default
        :func:`default_store_path`). ``user`` is recorded in the audit trail (default: the
        login name). Raises :class:`NotAStoreError` for a folder that holds other things.
        """
        root = Path(path).expanduser() if path is not None else default_store_path()
        user = user or _login()
        marker = root / MARKER
        if root.exists() and not root.is_dir():
            raise NotAStoreError(f"{root}: is a file, not a plan store folder")
        if not marker.exists():
            leftovers = [p.name for p in root.iterdir()] if root.is_dir() else []
            # A store whose creation was interrupted holds only its database files.
            if any(not n.startswith(DB_NAME) for n in leftovers):
                raise NotAStoreError(f"{root}: not an ids-engine plan store (no {MARKER}); it holds "
                                     f"{', '.join(sorted(leftovers)[:5])}{' ...' if len(leftovers) > 5 else ''}")
            if not create:
                raise NotAStoreError(f"{root}: no plan store here (no {MARKER})")
            root.mkdir(parents=True, exist_ok=True)
            conn = cls._connect(root)
            with conn:
                conn.executescript(SCHEMA)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?), ('schema_version', ?)",
                             (FORMAT, str(SCHEMA_VERSION)))
            for sub in ("patients", "plans", ".staging", ".trash"):
                (root / sub).mkdir(exist_ok=True)
            atomic_text(marker, json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION}, indent=1) + "\n")
            _log.info("created plan store at %s", root)
            return cls(root, conn, user)
        try:
            doc = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise NotAStoreError(f"{marker}: not a readable store marker ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise NotAStoreError(f"{marker}: field 'format' is not {FORMAT!r}")
        if int(doc.get("schema_version", 0)) > SCHEMA_VERSION:
            raise StoreError(f"{marker}: schema version {doc.get('schema_version')} is newer than this ids-engine "
                             f"reads ({SCHEMA_VERSION})")
        if not (root / DB_NAME).is_file():
            raise StoreError(f"{root / DB_NAME}: the store's database is missing")
        conn = cls._connect(root)
        store = cls(root, conn, user)
        store._recover()
        return store

    @staticmethod
    def _connect(root: Path) -> sqlite3.Connection:
        db = root / DB_NAME
        try:
            conn = sqlite3.connect(db, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone() \
                if conn.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone() else None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{db}: not a readable SQLite database ({exc})") from None
        if row is not None and row[0] != FORMAT:
            raise NotAStoreError(f"{db}: table meta says format {row[0]!r}, not {FORMAT!r}")
        return conn

    def _recover(self) -> None:
        """Finish or undo what a crashed writer left: unindexed plan folders whose lock is
        free (an import, save or copy killed before its commit; a deletion killed after
        it), and staging and trash folders."""
        with self._lock:
            keys = {r[0] for r in self._q("SELECT key FROM plans")}
        plans = self.root / "plans"
        for d in sorted(plans.iterdir()) if plans.is_dir() else ():
            if d.name not in keys and d.is_dir():
                # Another process may have committed this plan since the keys were read: the
                # table is asked again once the folder's lock is held.
                self._remove_if_unlocked(d, still_orphan=lambda key=d.name: self._plan_row_missing(key))
        for sub in (".staging", ".trash"):
            for d in sorted((self.root / sub).iterdir()) if (self.root / sub).is_dir() else ():
                # A staging folder is made a moment before its lock is taken: leave young ones.
                try:
                    young = sub == ".staging" and _dt.datetime.now().timestamp() - d.stat().st_mtime < 60.0
                except OSError:
                    continue
                if not young:
                    self._remove_if_unlocked(d)

    def _plan_row_missing(self, key: str) -> bool:
        with self._lock:
            return not self._q("SELECT 1 FROM plans WHERE key = ?", (key,))

    @staticmethod
    def _remove_if_unlocked(d: Path, still_orphan=None) -> None:
        sess = d / "session"
        lock = None
        if sess.is_dir():
            try:
                lock = FolderLock(sess).acquire()
            except FolderLockedError:
                return  # a live writer is building it
        try:
            if still_orphan is None or still_orphan():
                shutil.rmtree(d, ignore_errors=True)
        finally:
            if lock is not None:
                lock.release()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "PlanStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PlanStore({str(self.root)!r})"

    # ------------------------------------------------------------------ SQL helpers
    def _q(self, sql: str, args=()) -> list:
        if self._closed:
            raise StoreError(f"{self.root}: the store is closed")
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.root / DB_NAME}: {exc}") from None

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.root}: the store is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.root / DB_NAME}: {exc}") from None
            try:
                yield self._conn
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.DatabaseError:  # pragma: no cover
                    pass
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.root / DB_NAME}: {exc}") from None

    def _audit(self, c, action: str, *, patient_key=None, plan_key=None, **detail) -> None:
        c.execute("INSERT INTO audit (time, user, action, patient_key, plan_key, detail_json) VALUES (?,?,?,?,?,?)",
                  (_now(), self.user, action, patient_key, plan_key, json.dumps(detail, sort_keys=True)))

    # ------------------------------------------------------------------ patients
    def add_patient(self, patient, *, patient_id: str, name: str | None = None) -> str:
        """Add a patient (or, for a known ``patient_id``, a new image set of it) and return
        its store key (random: identifiers are never used as keys).

        Parameters
        ----------
        patient : :class:`ids_engine.model.Patient`; its CT (image set) and structures
            (structure set) are stored as arrays. An image set already stored (same CT
            values) is not stored twice.
        patient_id : the clinic's patient identifier (kept only in the patients table).
        name : the patient's name (kept only in the patients table).
        """
        from ids_engine.session import case_fingerprint

        if not isinstance(patient_id, str) or not patient_id.strip():
            raise StoreError(f"add_patient: patient_id must be a non-empty string, got {type(patient_id).__name__}")
        fp = case_fingerprint(patient)
        rows = self._q("SELECT key FROM patients WHERE patient_id=?", (patient_id,))
        pkey = rows[0][0] if rows else uuid.uuid4().hex[:16]
        have = self._q("SELECT key FROM image_sets WHERE patient_key=? AND ct_sha256=?", (pkey, fp["ct_sha256"]))
        if rows and have:
            return pkey
        iskey = uuid.uuid4().hex[:16]
        rel = Path("patients") / pkey / iskey
        folder = self.root / rel
        folder.mkdir(parents=True, exist_ok=True)
        ct_path = folder / "ct_hu.npy"
        _atomic_npy(ct_path, np.ascontiguousarray(patient.ct_hu, np.float32))
        st_path = folder / "structures.npz"
        atomic_npz(st_path, {f"mask_{k}": np.packbits(s.mask.ravel()) for k, s in enumerate(patient.structures)})
        structures = [{"name": s.name, "kind": s.kind.value, "colour": list(s.colour)} for s in patient.structures]
        g = patient.grid
        grid = {"shape_zyx": list(g.shape_zyx), "spacing_mm_zyx": list(g.spacing_mm_zyx),
                "origin_mm_xyz": list(g.origin_mm_xyz), "patient_position": patient.patient_position}
        ct_sha, st_sha = sha256_file(ct_path), sha256_file(st_path)
        with self._tx() as c:
            rows = c.execute("SELECT key FROM patients WHERE patient_id=?", (patient_id,)).fetchall()
            if rows and rows[0][0] != pkey:  # another process added this patient meanwhile
                pkey = rows[0][0]
            if not rows:
                c.execute("INSERT INTO patients VALUES (?,?,?,?)", (pkey, patient_id, name, _now()))
                self._audit(c, "add patient", patient_key=pkey)
            if c.execute("SELECT 1 FROM image_sets WHERE patient_key=? AND ct_sha256=?",
                         (pkey, fp["ct_sha256"])).fetchone():
                return pkey
            c.execute("INSERT INTO image_sets VALUES (?,?,?,?,?,?,?)",
                      (iskey, pkey, fp["ct_sha256"], json.dumps(grid), str(rel / "ct_hu.npy"), ct_sha, _now()))
            c.execute("INSERT INTO structure_sets VALUES (?,?,?,?,?,?)",
                      (uuid.uuid4().hex[:16], iskey, json.dumps(structures), str(rel / "structures.npz"), st_sha, _now()))
            self._audit(c, "add image set", patient_key=pkey, image_set=iskey, structures=len(structures))
        _log.info("patient %s: image set %s stored", pkey, iskey)
        return pkey

    def patients(self) -> list[dict]:
        """Every patient: key, patient_id, name, image sets (identifiers: do not log them)."""
        out = []
        for r in self._q("SELECT * FROM patients ORDER BY created"):
            n = self._q("SELECT COUNT(*) FROM image_sets WHERE patient_key=?", (r["key"],))[0][0]
            out.append({"key": r["key"], "patient_id": r["patient_id"], "name": r["name"], "image_sets": n})
        return out

    def find_patient(self, patient_id: str) -> str | None:
        """The key of the patient with ``patient_id``, or None."""
        rows = self._q("SELECT key FROM patients WHERE patient_id=?", (patient_id,))
        return rows[0][0] if rows else None

    def image_sets(self, patient_key: str) -> list[dict]:
        self._patient_row(patient_key)
        return [{"key": r["key"], "ct_sha256": r["ct_sha256"], "grid": json.loads(r["grid_json"]), "created": r["created"]}
                for r in self._q("SELECT * FROM image_sets WHERE patient_key=? ORDER BY created", (patient_key,))]

    def load_patient(self, patient_key: str, image_set: str | None = None):
        """Rebuild a :class:`~ids_engine.model.Patient` from a stored image set (default:
        the newest) and its structure set."""
        from ids_engine.model import Grid, Patient, Structure, StructureKind

        self._patient_row(patient_key)
        sql = "SELECT * FROM image_sets WHERE patient_key=?" + (" AND key=?" if image_set else "") + " ORDER BY created DESC"
        rows = self._q(sql, (patient_key, image_set) if image_set else (patient_key,))
        if not rows:
            raise StoreError(f"patient {patient_key}: no image set {image_set or ''}".rstrip())
        r = rows[0]
        grid_doc = json.loads(r["grid_json"])
        grid = Grid(tuple(grid_doc["shape_zyx"]), tuple(grid_doc["spacing_mm_zyx"]), tuple(grid_doc["origin_mm_xyz"]))
        ct_path = self.root / r["path"]
        try:
            ct = np.load(ct_path)
        except FileNotFoundError:
            raise StoreError(f"{ct_path}: image set file of patient {patient_key} is missing") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{ct_path}: image set file is damaged ({exc})") from None
        ss = self._q("SELECT * FROM structure_sets WHERE image_set_key=? ORDER BY created DESC", (r["key"],))
        structures = []
        if ss:
            st_path = self.root / ss[0]["path"]
            try:
                with np.load(st_path) as arrays:
                    for k, d in enumerate(json.loads(ss[0]["structures_json"])):
                        bits = np.unpackbits(arrays[f"mask_{k}"])[: int(np.prod(grid.shape_zyx))]
                        structures.append(Structure(d["name"], StructureKind(d["kind"]),
                                                    bits.astype(bool).reshape(grid.shape_zyx), grid,
                                                    tuple(d.get("colour", (1.0, 0.0, 0.0)))))
            except FileNotFoundError:
                raise StoreError(f"{st_path}: structure set file of patient {patient_key} is missing") from None
            except (OSError, ValueError, KeyError) as exc:
                raise StoreError(f"{st_path}: structure set file is damaged ({exc})") from None
        return Patient(grid, ct, tuple(structures), name=f"patient {patient_key}",
                       patient_position=grid_doc.get("patient_position", "HFS"))

    def _patient_row(self, patient_key: str):
        rows = self._q("SELECT * FROM patients WHERE key=?", (patient_key,))
        if not rows:
            raise StoreError(f"no patient with key {patient_key!r} in the store {self.root}")
        return rows[0]

    # ------------------------------------------------------------------ plans: lookup
    def _row(self, ref) -> sqlite3.Row:
        """The plan row of a PlanRef, a plan key, a unique plan name, or 'patient_key:name'."""
        if isinstance(ref, PlanRef):
            rows = self._q("SELECT * FROM plans WHERE key=?", (ref.key,))
            if not rows:
                raise PlanNotFoundError(f"{ref} is not in the store {self.root} (deleted?)")
            return rows[0]
        if not isinstance(ref, str) or not ref:
            raise PlanNotFoundError(f"no plan {ref!r}: give a PlanRef, a plan key or a plan name")
        rows = self._q("SELECT * FROM plans WHERE key=?", (ref,))
        if rows:
            return rows[0]
        if ":" in ref:
            pk, name = ref.split(":", 1)
            rows = self._q("SELECT * FROM plans WHERE patient_key=? AND name=?", (pk, name))
        else:
            rows = self._q("SELECT * FROM plans WHERE name=?", (ref,))
            if not rows and len(ref) >= 6:
                rows = self._q("SELECT * FROM plans WHERE key LIKE ?", (ref + "%",))
        if len(rows) == 1:
            return rows[0]
        if not rows:
            names = [r[0] for r in self._q("SELECT name FROM plans ORDER BY name LIMIT 20")]
            raise PlanNotFoundError(f"no plan {ref!r} in the store {self.root}"
                                    + (f" (plans: {', '.join(names)})" if names else " (it has no plans)"))
        raise PlanNotFoundError(f"plan name {ref!r} is ambiguous ({len(rows)} patients have one): "
                                f"give 'patient_key:name' or the plan key")

    def _ref(self, row) -> PlanRef:
        n = self._q("SELECT COUNT(*) FROM requests WHERE plan_key=? AND op='request'", (row["key"],))[0][0]
        return PlanRef(row["key"], row["patient_key"], row["name"], int(row["plan_id"]), row["status"], int(n),
                       row["parent_key"], row["created"], row["modified"], row["content_sha256"])

    def get(self, ref) -> PlanRef:
        """The current state of a plan (by PlanRef, key, name or 'patient_key:name')."""
        return self._ref(self._row(ref))

    def list_plans(self, patient_key: str | None = None) -> list[PlanRef]:
        """Plans (of one patient, or all), oldest first."""
        if patient_key is None:
            rows = self._q("SELECT * FROM plans ORDER BY created, name")
        else:
            self._patient_row(patient_key)
            rows = self._q("SELECT * FROM plans WHERE patient_key=? ORDER BY created, name", (patient_key,))
        return [self._ref(r) for r in rows]

    def plan_folder(self, ref) -> Path:
        """The plan's folder (``session/``, ``files/``, ``evidence/``); read it, do not write it."""
        return self.root / "plans" / self._row(ref)["key"]

    def session_folder(self, ref) -> Path:
        return self.plan_folder(ref) / "session"

    def plan_file(self, ref, name: str) -> Path | None:
        """A file that came with the plan (e.g. ``protocol.toml`` of ``ids plan``), or None."""
        row = self._row(ref)
        hit = self._q("SELECT path FROM plan_files WHERE plan_key=? AND path=?", (row["key"], f"files/{name}"))
        return self.root / "plans" / row["key"] / hit[0][0] if hit else None

    # ------------------------------------------------------------------ plans: adding
    def _check_new_name(self, patient_key: str, name: str) -> str:
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "\n" in name or ":" in name:
            raise StoreError(f"plan name {name!r}: give a non-empty name without ':' or surrounding blanks")
        self._patient_row(patient_key)
        if self._q("SELECT 1 FROM plans WHERE patient_key=? AND name=?", (patient_key, name)):
            raise StoreError(f"plan {name!r} exists already for patient {patient_key}; choose another name")
        return name

    def _image_set_for(self, patient_key: str, session_json: Path) -> tuple[str | None, dict]:
        try:
            doc = json.loads(session_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{session_json}: not a readable session file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != "ids-engine session":
            raise StoreError(f"{session_json}: field 'format' is not 'ids-engine session'")
        ct = (doc.get("case_fingerprint") or {}).get("ct_sha256")
        rows = self._q("SELECT key FROM image_sets WHERE patient_key=? AND ct_sha256=?", (patient_key, ct))
        if not rows:
            raise StoreError(f"{session_json}: the session was made on a CT that is not an image set of patient "
                             f"{patient_key} (add it with add_patient first)")
        return rows[0][0], doc

    def _new_plan_folder(self) -> tuple[str, Path, FolderLock]:
        key = uuid.uuid4().hex[:20]
        staging = self.root / ".staging" / key
        (staging / "session").mkdir(parents=True)
        return key, staging, FolderLock(staging / "session").acquire()

    def _move_in(self, staging: Path, key: str, lock: FolderLock) -> Path:
        final = self.root / "plans" / key
        fsync_folder(staging)
        os.replace(staging, final)
        fsync_folder(final.parent)
        fsync_folder(staging.parent)
        lock.folder, lock.path = final / "session", final / "session" / FolderLock.NAME
        return final

    def _insert_plan(self, c, key: str, patient_key: str, name: str, image_set_key, parent_key, plan_id: int,
                     doc: dict, folder: Path, status: str = "draft") -> None:
        now = _now()
        c.execute("INSERT INTO plans (key, patient_key, name, image_set_key, parent_key, plan_id, status, "
                  "prescription_gy, created, modified, header_sha256, initial_sha256, journal_bytes, journal_sha256, "
                  "n_lines) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0,?,0)",
                  (key, patient_key, name, image_set_key, parent_key, int(plan_id), status,
                   float(doc["prescription_gy"]), now, now, sha256_file(folder / "session" / "session.json"),
                   sha256_file(folder / "session" / "initial_fluences.npz"), sha256_bytes(b"")))
        for i, b in enumerate(doc.get("beams", [])):
            c.execute("INSERT INTO beams VALUES (?,?,?,?,?,?,?,?,?)",
                      (key, i, b["name"], b["gantry_deg"], b["couch_deg"], b["collimator_deg"],
                       json.dumps(b["isocentre_mm_xyz"]), b["sad_mm"], b["energy_mv"]))
        files = folder / "files"
        for p in sorted(files.iterdir()) if files.is_dir() else ():
            c.execute("INSERT INTO plan_files VALUES (?,?,?)", (key, f"files/{p.name}", sha256_file(p)))

    def import_session(self, folder: "str | Path", *, patient_key: str, plan_name: str,
                       parent=None) -> PlanRef:
        """Import a saved session folder (``ids shape --out``; or an ``ids plan --out`` folder,
        whose ``session/`` is taken with its ``protocol.toml`` and ``plan.json``) as a new plan.

        The folder is copied (complete journal lines only: a live writer's request in flight
        is not), renamed into the store and indexed in one transaction. The session's CT
        must be an image set of the patient (:meth:`add_patient`).
        """
        src = Path(folder)
        extras = []
        if not is_session_folder(src) and is_session_folder(src / "session"):
            extras = [src / n for n in _PLAN_EXTRA_FILES if (src / n).is_file()]
            src = src / "session"
        if not src.is_dir():
            raise StoreError(f"{src}: no such session folder")
        if not is_session_folder(src):
            missing = [n for n in ("session.json", "initial_fluences.npz", "journal.jsonl") if not (src / n).is_file()]
            raise StoreError(f"{src}: not a session folder ({', '.join(missing)} missing)")
        self._check_new_name(patient_key, plan_name)
        image_set_key, doc = self._image_set_for(patient_key, src / "session.json")
        parent_key = self._row(parent)["key"] if parent is not None else None
        key, staging, lock = self._new_plan_folder()
        try:
            try:
                journal = copy_session_folder(src, staging / "session")
            except FileNotFoundError as exc:
                raise StoreError(f"{src}: a file the journal names is missing ({exc.filename})") from None
            if extras:
                (staging / "files").mkdir()
                for p in extras:
                    copy_file_durably(p, staging / "files" / p.name)
                fsync_folder(staging / "files")
            self._copy_relative_case(src, staging, doc)
            lines = parse_lines(journal, 0, 0)
            plan_id = max(1, lines[-1].session_plan_id) if lines else 1
            final = self._move_in(staging, key, lock)
            with self._tx() as c:
                self._check_new_name(patient_key, plan_name)
                self._insert_plan(c, key, patient_key, plan_name, image_set_key, parent_key, plan_id, doc, final)
                self._sync_in(c, key, None, count_changes=False)
                self._audit(c, "import session", patient_key=patient_key, plan_key=key, plan=plan_name,
                            plan_id=plan_id, requests=sum(1 for ln in lines if ln.op == "request"), parent=parent_key)
        except BaseException:
            self._abandon(key, staging, lock)
            raise
        lock.release()
        _log.info("imported a session as plan %r (%s)", plan_name, key)
        return self.get(key)

    @staticmethod
    def _copy_relative_case(src: Path, staging: Path, doc: dict) -> None:
        """A session naming its DICOM case relative to itself (an adapted plan's ``../new_ct``)
        takes that folder along, at the same place relative to the stored session, so the
        stored plan reopens on its own."""
        case = doc.get("case") or {}
        rel = case.get("dicom")
        if case.get("relative_to") != "session" or not rel or not (src / rel).is_dir():
            return
        dst = (staging / "session" / rel).resolve()
        root = staging.resolve()
        inside = dst != root and root in dst.parents
        if not inside or dst.relative_to(root).parts[0] in ("session", "files"):
            raise StoreError(f"{src / 'session.json'}: field 'case': the DICOM folder {rel!r} must lie beside the "
                             "session folder (like an adapted plan's ../new_ct), not in it or outside the plan")
        dst.mkdir(parents=True, exist_ok=True)
        for p in sorted((src / rel).iterdir()):
            if p.is_file():
                copy_file_durably(p, dst / p.name)
        fsync_folder(dst)

    def _abandon(self, key: str, staging: Path, lock: FolderLock) -> None:
        """Undo a plan folder whose transaction did not commit."""
        if not self._q("SELECT 1 FROM plans WHERE key=?", (key,)):
            shutil.rmtree(self.root / "plans" / key, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
        lock.release()

    def save_session(self, session, *, patient_key: str, plan_name: str, parent=None,
                     attach: bool = False) -> PlanRef:
        """Store an open session (its starting plan and whole history) as a new plan.

        With ``attach`` the session journals into the new plan from now on (it leaves the
        folder or stored plan it journaled to, which stays as it was) and each operation is
        indexed as it is journaled; otherwise the session goes on as before.

        The stored plan replays bit for bit to the session's fluences and dose:

        * a session opened from this store (:meth:`load_session`, or attached before) is
          stored by copying its plan's journal, which it has kept exactly as it went;
        * a session without requests is stored as it is;
        * any other session's history is written out afresh (its requests, with the undone
          ones as requests and undos), which replays to the same plan up to float32
          rounding when requests were undone and dropped: the stored plan is replayed once
          and, where its bits differ, the session takes the replayed fluences and dose (a
          difference far below any dose tolerance), so the session and the store agree.
        """
        from ids_engine.session import case_fingerprint

        if not session.case:
            raise StoreError("save_session: the session has no case description (open it from a phantom, DICOM or "
                             "matRad file) so it could not be reopened")
        self._check_new_name(patient_key, plan_name)
        ct = case_fingerprint(session.patient)["ct_sha256"]
        rows = self._q("SELECT key FROM image_sets WHERE patient_key=? AND ct_sha256=?", (patient_key, ct))
        if not rows:
            raise StoreError(f"save_session: the session's CT is not an image set of patient {patient_key} "
                             "(add it with add_patient first)")
        image_set_key = rows[0][0]
        parent_key = self._row(parent)["key"] if parent is not None else None
        key, staging, lock = self._new_plan_folder()
        with session._lock:
            old_dir, old_lock = session._journal_dir, session._lock_file
            own = getattr(session, "_store_plan_key", None)
            exact = (own is not None and old_dir is not None
                     and Path(old_dir) == self.root / "plans" / own / "session"
                     and bool(self._q("SELECT 1 FROM plans WHERE key=?", (own,))))
            old_hook = session.__dict__.pop("_append_op", None)  # a store hook of the plan it came from
            try:
                if exact:
                    copy_session_folder(Path(old_dir), staging / "session")
                else:
                    session._lock_file, session._journal_dir = None, None
                    try:
                        session._start_journal(staging / "session", lock)
                    finally:
                        session._journal_dir, session._lock_file = old_dir, old_lock
                    if session.journal or session._redo:
                        self._adopt_replay(session, staging / "session")
                doc = json.loads((staging / "session" / "session.json").read_text())
                if exact:  # its journal copied as it is: a session-relative case comes along
                    self._copy_relative_case(Path(old_dir), staging, doc)
                final = self._move_in(staging, key, lock)
                with self._tx() as c:
                    self._check_new_name(patient_key, plan_name)
                    self._insert_plan(c, key, patient_key, plan_name, image_set_key, parent_key, session.plan_id,
                                      doc, final)
                    self._sync_in(c, key, session, count_changes=False)
                    self._audit(c, "save session", patient_key=patient_key, plan_key=key, plan=plan_name,
                                plan_id=int(session.plan_id), requests=len(session.journal), parent=parent_key)
            except BaseException:
                if old_hook is not None:
                    session._append_op = old_hook
                self._abandon(key, staging, lock)
                raise
            if attach:
                if old_lock is not None and old_lock is not lock:
                    old_lock.release()
                session._lock_file, session._journal_dir = lock, final / "session"
                self._install_hook(session, key)
            else:
                if old_hook is not None:
                    session._append_op = old_hook
                lock.release()
        _log.info("stored a session as plan %r (%s)", plan_name, key)
        return self.get(key)

    @staticmethod
    def _adopt_replay(session, folder: Path) -> None:
        """Replay the session folder just written; where its bits differ from the live
        session's, the session takes the replayed plan state (see :meth:`save_session`)."""
        from ids_engine.session import Session

        try:
            replayed = Session.load(folder, keep_journaling=False)
        except ValueError as exc:  # e.g. a case description this ids-engine cannot rebuild
            _log.warning("the stored plan could not be replayed to check it (%s); it is stored as written",
                         type(exc).__name__)
            return
        if content_hash(replayed) != content_hash(session) or dose_hash(replayed) != dose_hash(session):
            session.engine.restore(replayed.engine.snapshot())
            # The exact undo of the last request follows the replayed state (the session's own
            # snapshot is of a state it no longer has; the replay's is of this one).
            u = replayed._undo_snap
            last = session.journal[-1].id if session.journal else None
            session._undo_snap = u if u is not None and u[0] == last and u[2] == session.engine.state_version else None
            _log.info("the session took its stored plan's replayed fluences and dose (float32 rounding of undone "
                      "requests)")

    # ------------------------------------------------------------------ the index
    def sync(self, ref, session=None) -> PlanRef:
        """Index what the plan's journal holds beyond its index (idempotent; any process)."""
        key = self._row(ref)["key"]
        with self._tx() as c:
            self._sync_in(c, key, session)
        return self.get(key)

    def _sync_in(self, c, key: str, session, *, count_changes: bool = True) -> int:
        """Index new complete journal lines of plan ``key`` (inside a transaction). Returns
        how many lines were indexed. With ``session`` (the plan's live session, at the state
        of the whole journal) its content and dose hashes are recorded."""
        row = c.execute("SELECT * FROM plans WHERE key=?", (key,)).fetchone()
        folder = self.root / "plans" / key / "session"
        try:
            header = sha256_file(folder / "session.json")
            initial = self._file_sha(folder / "initial_fluences.npz")
            raw = complete_journal(folder)
        except FileNotFoundError as exc:
            raise StoreIntegrityError(f"plan {row['name']!r}: {exc.filename} is missing") from None
        start, line0, prev = int(row["journal_bytes"]), int(row["n_lines"]), row["last_line_plan_id"]
        plan_id, changed = int(row["plan_id"]), False
        new_start = header != row["header_sha256"] or initial != row["initial_sha256"]
        whole = new_start or len(raw) < start or sha256_bytes(raw[:start]) != row["journal_sha256"]
        if whole:  # a new starting plan (set_plan), or a journal cut back: index it afresh
            c.execute("DELETE FROM requests WHERE plan_key=?", (key,))
            start, line0, prev = 0, 0, None
            if count_changes:
                plan_id, changed = plan_id + 1, True
        lines = parse_lines(raw, start, line0)
        if not lines and not whole and session is None:
            return 0  # nothing new: no write (a sync of an unchanged plan costs no fsync)
        now = _now()
        for ln in lines:
            affecting = (ln.op == "request" and ln.patches > 0) or \
                        (ln.op in ("undo", "redo") and prev is not None and ln.session_plan_id != prev)
            # (after a journal was cut back, its lines were counted when first indexed)
            if affecting and count_changes and (new_start or not whole):
                plan_id += 1
                changed = True
            file_sha = None
            if ln.file:
                try:
                    file_sha = sha256_file(folder / "requests" / ln.file)
                except FileNotFoundError:
                    raise StoreIntegrityError(f"plan {row['name']!r}: {folder / 'requests' / ln.file} (named by "
                                              f"journal line {ln.line + 1}) is missing") from None
            c.execute("INSERT INTO requests (plan_key, line, end_bytes, op, request_id, kind, file, file_sha256, "
                      "session_plan_id, plan_id, summary_json, indexed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (key, ln.line, ln.end_bytes, ln.op, ln.request_id, ln.kind, ln.file, file_sha,
                       ln.session_plan_id, plan_id, json.dumps(ln.summary) if ln.summary else None, now))
            prev = ln.session_plan_id
        end = lines[-1].end_bytes if lines else start
        n_lines = line0 + len(lines)
        updates = dict(header_sha256=header, initial_sha256=initial, journal_bytes=end,
                       journal_sha256=sha256_bytes(raw[:end]), n_lines=n_lines, last_line_plan_id=prev,
                       plan_id=plan_id)
        if lines or whole:
            updates["modified"] = now
        if whole:  # the recorded hashes were of another starting plan or history
            updates.update(content_sha256=None, dose_sha256=None, content_at_bytes=None)
        if changed and row["status"] != "draft":
            if row["status"] == "approved":
                _log.warning("plan %s was approved and its content changed in place: its approval no longer holds", key)
            updates.update(status="draft", status_evidence=None)
            self._audit(c, "status", patient_key=row["patient_key"], plan_key=key, status="draft",
                        was=row["status"], why="dose-affecting change")
        if session is not None and len(raw) == end:
            ch, dh = content_hash(session), dose_hash(session)
            updates.update(content_sha256=ch, dose_sha256=dh, content_at_bytes=end)
            if n_lines:
                c.execute("UPDATE requests SET fluence_sha256=?, dose_sha256=? WHERE plan_key=? AND line=?",
                          (ch, dh, key, n_lines - 1))
        sets = ", ".join(f"{k}=?" for k in updates)
        c.execute(f"UPDATE plans SET {sets} WHERE key=?", (*updates.values(), key))
        for ln in lines:
            if count_changes:
                self._audit(c, ln.op, patient_key=row["patient_key"], plan_key=key, line=ln.line,
                            request_id=ln.request_id, kind=ln.kind)
        return len(lines)

    def _file_sha(self, path: Path) -> str:
        """SHA-256 of a file that is only ever replaced whole (atomically), cached by its
        inode, size and modification time (the starting fluences: megabytes, hashed on
        every sync otherwise)."""
        st = path.stat()
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._sha_cache.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        sha = sha256_file(path)
        self._sha_cache[path] = (sig, sha)
        return sha

    def _install_hook(self, session, key: str) -> None:
        """Index each operation the session journals, right after its line is durable."""
        from ids_engine.session import Session

        store_ref = weakref.ref(self)
        plain = Session._append_op.__get__(session)
        folder = self.root / "plans" / key / "session"

        def _append_op(entry, _plain=plain, _key=key):
            _plain(entry)
            st = store_ref()
            if st is None or st._closed or session._journal_dir is None or Path(session._journal_dir) != folder:
                return  # the store closed, or the session journals elsewhere now
            try:
                with st._tx() as c:
                    st._sync_in(c, _key, session)
            except Exception as exc:  # the journal line is durable; the index catches up on the next sync
                _log.warning("plan %s: the store's index will catch up later (%s: %s)", _key, type(exc).__name__, exc)

        session._append_op = _append_op
        session._store_plan_key = key
        self._open_sessions[key] = weakref.ref(session)

    # ------------------------------------------------------------------ opening plans
    def load_session(self, ref, *, write: bool | None = None, progress=None, verify: bool = True):
        """Reopen a stored plan as a :class:`~ids_engine.session.Session` (replays its journal:
        the identical plan).

        ``write``: journal further operations into the store (the plan's lock is held until
        ``session.close()``; each operation is indexed as it is journaled). Default: write
        unless the plan is approved (an approved plan opens read-only; ``write=True`` on it
        raises :class:`ApprovedPlanError`). A second writer gets
        :class:`PlanOpenElsewhereError`. ``verify`` compares the replayed fluences and dose
        with the hashes recorded when the plan was written (:class:`StoreIntegrityError`
        if they differ).
        """
        from ids_engine.session import Session

        row = self._row(ref)
        key, name = row["key"], row["name"]
        if write is None:
            write = row["status"] != "approved"
        if write and row["status"] == "approved":
            raise ApprovedPlanError(f"plan {name!r} is approved and is never changed in place: copy it "
                                    f"(store.copy_plan(plan, 'new name') or ids store copy) and change the copy")
        folder = self.root / "plans" / key / "session"
        self._check_request_files(row)
        if write:
            try:
                s = Session.load(folder, progress=progress, keep_journaling=True)
            except FolderLockedError:
                raise PlanOpenElsewhereError(f"plan {name!r} is open elsewhere ({_lock_holder(folder)})") from None
        else:
            s = Session.load(folder, progress=progress, keep_journaling=False)
        try:
            good = int(getattr(s, "_journal_good_bytes", -1))
            with self._tx() as c:  # index what was journaled since (e.g. by a session killed before its sync)
                self._sync_in(c, key, None)
            if verify:
                self._verify_session(key, name, s, good)
            if write:
                with self._tx() as c:
                    self._sync_in(c, key, s)
                self._install_hook(s, key)
        except BaseException:
            s.close()
            raise
        return s

    def _check_request_files(self, row) -> None:
        folder = self.root / "plans" / row["key"] / "session"
        for n in ("session.json", "initial_fluences.npz", "journal.jsonl"):
            if not (folder / n).is_file():
                raise StoreIntegrityError(f"plan {row['name']!r}: {folder / n} is missing")
        for r in self._q("SELECT file, line FROM requests WHERE plan_key=? AND file IS NOT NULL", (row["key"],)):
            p = folder / "requests" / r["file"]
            if not p.is_file():
                raise StoreIntegrityError(f"plan {row['name']!r}: {p} (request of history line {r['line'] + 1}) is "
                                          "missing")

    def _verify_session(self, key: str, name: str, s, good_bytes: int) -> bool | None:
        """Compare a replayed session with the hashes recorded at the same journal position."""
        if good_bytes <= 0:
            row = self._q("SELECT content_sha256, dose_sha256, content_at_bytes FROM plans WHERE key=?", (key,))[0]
            if row["content_at_bytes"] != 0 or row["dose_sha256"] is None:
                return None
            ch, dh = row["content_sha256"], row["dose_sha256"]
        else:
            rows = self._q("SELECT fluence_sha256, dose_sha256 FROM requests WHERE plan_key=? AND end_bytes=?",
                           (key, good_bytes))
            if not rows or rows[0]["dose_sha256"] is None:
                return None
            ch, dh = rows[0]["fluence_sha256"], rows[0]["dose_sha256"]
        if content_hash(s) != ch or dose_hash(s) != dh:
            raise StoreIntegrityError(f"plan {name!r}: replaying its history does not give the fluences and dose "
                                      "recorded when it was written")
        return True

    def verify_replay(self, ref) -> dict:
        """Replay the plan's history up to its last line with recorded hashes and compare the
        fluences and dose bit for bit. Returns {"line", "requests", "match"} ("line" None and
        "match" None when nothing was recorded)."""
        from ids_engine.session import Session

        row = self._row(ref)
        key = row["key"]
        rec = self._q("SELECT line, end_bytes, fluence_sha256, dose_sha256 FROM requests WHERE plan_key=? "
                      "AND dose_sha256 IS NOT NULL ORDER BY line DESC LIMIT 1", (key,))
        folder = self.root / "plans" / key / "session"
        if not rec:
            if row["content_at_bytes"] == 0 and row["dose_sha256"]:
                rec_end, ch, dh, line = 0, row["content_sha256"], row["dose_sha256"], -1
            else:
                return {"line": None, "requests": 0, "match": None}
        else:
            rec_end, ch, dh, line = rec[0]["end_bytes"], rec[0]["fluence_sha256"], rec[0]["dose_sha256"], rec[0]["line"]
        with tempfile.TemporaryDirectory(prefix="ids-store-replay-") as tmp:
            # A copy cut at the recorded line (the plan may have moved on, or a writer may append).
            t = Path(tmp) / "session"
            (t / "requests").mkdir(parents=True)
            raw = complete_journal(folder)[:rec_end]
            for n in ("session.json", "initial_fluences.npz"):
                shutil.copyfile(folder / n, t / n)
            for ln in parse_lines(raw, 0, 0):
                if ln.file:
                    shutil.copyfile(folder / "requests" / ln.file, t / "requests" / ln.file)
            (t / "journal.jsonl").write_bytes(raw)
            s = Session.load(t, keep_journaling=False)
            match = content_hash(s) == ch and dose_hash(s) == dh
            n = len(s.journal)
        return {"line": line, "requests": n, "match": bool(match)}

    # ------------------------------------------------------------------ plan operations
    def _hold(self, row) -> FolderLock:
        folder = self.root / "plans" / row["key"] / "session"
        try:
            return FolderLock(folder).acquire()
        except FolderLockedError:
            raise PlanOpenElsewhereError(f"plan {row['name']!r} is open elsewhere ({_lock_holder(folder)})") from None

    def copy_plan(self, ref, new_name: str, *, patient_key: str | None = None) -> PlanRef:
        """Copy a plan under a new name (the old one stays). The copy keeps the plan ID and
        the history, starts unapproved ("draft") and names the source as its parent."""
        row = self._row(ref)
        pk = patient_key or row["patient_key"]
        self._check_new_name(pk, new_name)
        if pk != row["patient_key"]:
            raise StoreError(f"copy_plan: plan {row['name']!r} belongs to another patient than {pk}")
        src = self.root / "plans" / row["key"]
        key, staging, lock = self._new_plan_folder()
        try:
            copy_session_folder(src / "session", staging / "session")
            if (src / "files").is_dir():
                (staging / "files").mkdir()
                for p in sorted((src / "files").iterdir()):
                    copy_file_durably(p, staging / "files" / p.name)
                fsync_folder(staging / "files")
            doc = json.loads((staging / "session" / "session.json").read_text())
            self._copy_relative_case(src / "session", staging, doc)
            final = self._move_in(staging, key, lock)
            with self._tx() as c:
                self._check_new_name(pk, new_name)
                cur = c.execute("SELECT * FROM plans WHERE key=?", (row["key"],)).fetchone()
                if cur is None:
                    raise PlanNotFoundError(f"plan {row['name']!r} was deleted while it was copied")
                self._insert_plan(c, key, pk, new_name, cur["image_set_key"], cur["key"], cur["plan_id"], doc, final)
                copied_journal = (final / "session" / "journal.jsonl").read_bytes()
                if sha256_bytes(copied_journal[: cur["journal_bytes"]]) == cur["journal_sha256"] and \
                        cur["header_sha256"] == sha256_file(final / "session" / "session.json"):
                    # The copy's history is the source's: take over its index (hashes included).
                    c.execute("INSERT INTO requests SELECT ?, line, end_bytes, op, request_id, kind, file, file_sha256, "
                              "session_plan_id, plan_id, summary_json, fluence_sha256, dose_sha256, indexed "
                              "FROM requests WHERE plan_key=?", (key, cur["key"]))
                    c.execute("UPDATE plans SET journal_bytes=?, journal_sha256=?, n_lines=?, last_line_plan_id=?, "
                              "content_sha256=?, dose_sha256=?, content_at_bytes=?, initial_sha256=? WHERE key=?",
                              (cur["journal_bytes"], cur["journal_sha256"], cur["n_lines"], cur["last_line_plan_id"],
                               cur["content_sha256"], cur["dose_sha256"], cur["content_at_bytes"],
                               cur["initial_sha256"], key))
                self._sync_in(c, key, None)
                self._audit(c, "copy plan", patient_key=pk, plan_key=key, source=cur["key"], plan=new_name,
                            source_plan=cur["name"], plan_id=int(cur["plan_id"]))
        except BaseException:
            self._abandon(key, staging, lock)
            raise
        lock.release()
        _log.info("copied plan %r to %r (%s)", row["name"], new_name, key)
        return self.get(key)

    def rename_plan(self, ref, new_name: str) -> PlanRef:
        """Rename a plan (keeps its plan ID; an approved plan may be renamed)."""
        row = self._row(ref)
        self._check_new_name(row["patient_key"], new_name)
        with self._tx() as c:
            self._check_new_name(row["patient_key"], new_name)
            c.execute("UPDATE plans SET name=?, modified=? WHERE key=?", (new_name, _now(), row["key"]))
            self._audit(c, "rename plan", patient_key=row["patient_key"], plan_key=row["key"], was=row["name"],
                        plan=new_name)
        return self.get(row["key"])

    def delete_plan(self, ref, *, force: bool = False) -> None:
        """Delete a plan and its folder. An approved plan only with ``force``; a plan open
        for writing elsewhere is refused. Its approvals and audit entries stay."""
        row = self._row(ref)
        if row["status"] == "approved" and not force:
            raise ApprovedPlanError(f"plan {row['name']!r} is approved; delete it with force=True (ids store delete "
                                    "--force) if you mean it")
        lock = self._hold(row)
        try:
            with self._tx() as c:
                c.execute("DELETE FROM plans WHERE key=?", (row["key"],))
                self._audit(c, "delete plan", patient_key=row["patient_key"], plan_key=row["key"], plan=row["name"],
                            plan_id=int(row["plan_id"]), status=row["status"])
            trash = self.root / ".trash" / row["key"]
            try:
                os.replace(self.root / "plans" / row["key"], trash)
                fsync_folder(self.root / "plans")
            except OSError:  # pragma: no cover - swept on the next open
                trash = self.root / "plans" / row["key"]
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            lock.release()
        _log.info("deleted plan %r (%s)", row["name"], row["key"])

    def approve(self, ref, user: str, *, session=None) -> PlanRef:
        """Approve a plan: record ``user``, the time, the plan ID and the plan's content hash.

        ``session``: the plan's own open session (from :meth:`load_session` or
        ``save_session(attach=True)``; by default the one this store opened for writing, if
        any); it stops journaling (an approved plan is never changed in place). Otherwise
        the plan must not be open for writing elsewhere;
        the content hash is the recorded one, or computed by replaying the plan.
        """
        from ids_engine.session import Session

        if not isinstance(user, str) or not user.strip():
            raise StoreError("approve: give the approving user's name")
        row = self._row(ref)
        key, name = row["key"], row["name"]
        if row["status"] == "approved":
            raise ApprovedPlanError(f"plan {name!r} is approved already")
        if row["status"] in ("retired", "rejected"):
            raise StoreError(f"approve: plan {name!r} is {row['status']}; approve a copy of it instead")
        if session is None and key in self._open_sessions:  # a session this store opened for writing
            live = self._open_sessions[key]()
            if live is not None and live.folder is not None and getattr(live, "_store_plan_key", None) == key:
                session = live
        own = session is not None and getattr(session, "_store_plan_key", None) == key and session.folder is not None
        if session is not None and not own:
            raise StoreError(f"approve: the session given is not plan {name!r}'s open session")
        lock = session._lock_file if own else self._hold(row)
        approved = False
        try:
            # (the session's lock before the store's, as when the session journals)
            with session._lock if own else contextlib.nullcontext():
                with self._tx() as c:
                    self._sync_in(c, key, session if own else None)
            row = self._row(key)
            if row["content_sha256"] and row["content_at_bytes"] == row["journal_bytes"]:
                ch = row["content_sha256"]
            else:
                s = Session.load(self.root / "plans" / key / "session", keep_journaling=False)
                if int(getattr(s, "_journal_good_bytes", -1)) != row["journal_bytes"]:
                    raise StoreError(f"approve: plan {name!r}'s journal changed while it was approved; try again")
                ch = content_hash(s)
                with self._tx() as c:
                    c.execute("UPDATE plans SET content_sha256=?, dose_sha256=?, content_at_bytes=? WHERE key=?",
                              (ch, dose_hash(s), row["journal_bytes"], key))
            with self._tx() as c:
                now = _now()
                c.execute("INSERT INTO approvals (plan_key, user, time, content_sha256, plan_id) VALUES (?,?,?,?,?)",
                          (key, user, now, ch, int(row["plan_id"])))
                c.execute("UPDATE plans SET status='approved', status_evidence=NULL, modified=? WHERE key=?", (now, key))
                self._audit(c, "approve", patient_key=row["patient_key"], plan_key=key, approved_by=user,
                            plan_id=int(row["plan_id"]), content_sha256=ch)
            approved = True
        finally:
            if not own:
                lock.release()
            elif approved:
                session.close()
        _log.info("plan %r (%s) approved, plan ID %d", name, key, int(row["plan_id"]))
        return self.get(key)

    def approvals(self, ref) -> list[dict]:
        """The plan's approvals: user, time, plan_id, content_sha256 (oldest first)."""
        key = self._row(ref)["key"]
        return [dict(r) for r in self._q("SELECT user, time, plan_id, content_sha256 FROM approvals WHERE plan_key=? "
                                         "ORDER BY id", (key,))]

    def is_approval_valid(self, ref) -> bool:
        """True when the plan is approved and its content is the approved content."""
        row = self._row(ref)
        a = self.approvals(row["key"])
        return row["status"] == "approved" and bool(a) and a[-1]["content_sha256"] == row["content_sha256"] \
            and row["content_at_bytes"] == row["journal_bytes"]

    def set_status(self, ref, status: str, *, evidence_kind: str | None = None) -> PlanRef:
        """Set a plan's status (one of :data:`STATUSES`; approval only through :meth:`approve`).
        ``evidence_kind``: the kind of evidence (attached before) the status rests on."""
        if status not in STATUSES:
            raise StoreError(f"set_status: status {status!r} is not one of {', '.join(STATUSES)}"
                             + (" (use approve() to approve)" if status == "approved" else ""))
        row = self._row(ref)
        if row["status"] == "approved" and status != "retired":
            raise ApprovedPlanError(f"plan {row['name']!r} is approved; it can only be retired, or copied")
        if evidence_kind is not None:
            newest = self._q("SELECT key FROM evidence WHERE plan_key=? AND kind=? ORDER BY time DESC, key DESC LIMIT 1",
                             (row["key"], evidence_kind))
            if not newest:
                raise StoreError(f"set_status: plan {row['name']!r} has no evidence of kind {evidence_kind!r} "
                                 "(attach_evidence first)")
            # The status rests on evidence about the plan as it is now, not an earlier plan ID.
            for (detail,) in self._q("SELECT detail_json FROM audit WHERE plan_key=? AND action='evidence'",
                                     (row["key"],)):
                d = json.loads(detail)
                if d.get("evidence") == newest[0][0] and d.get("plan_id") is not None and \
                        int(d["plan_id"]) != int(row["plan_id"]):
                    raise StoreError(f"set_status: the newest {evidence_kind!r} evidence of plan {row['name']!r} was "
                                     f"made at plan ID {d['plan_id']}; the plan is at plan ID {row['plan_id']} now "
                                     "(attach new evidence first)")
        with self._tx() as c:
            c.execute("UPDATE plans SET status=?, status_evidence=?, modified=? WHERE key=?",
                      (status, evidence_kind, _now(), row["key"]))
            self._audit(c, "status", patient_key=row["patient_key"], plan_key=row["key"], status=status,
                        was=row["status"], evidence=evidence_kind)
        return self.get(row["key"])

    def attach_evidence(self, ref, kind: str, doc: dict, arrays: dict | None = None) -> str:
        """Store a document (JSON-able dict) and optional arrays with a plan, e.g. an
        adaptation's comparison report and qualification decision; returns the evidence key.
        Written under a fresh name, then indexed with an audit entry in one transaction."""
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise StoreError(f"attach_evidence: kind {kind!r} must be a short lower-case word ([a-z0-9_.-])")
        if not isinstance(doc, dict):
            raise StoreError(f"attach_evidence: doc must be a dict, got {type(doc).__name__}")
        try:
            text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"attach_evidence: doc of kind {kind!r} is not plain JSON ({exc})") from None
        row = self._row(ref)
        ekey = uuid.uuid4().hex[:16]
        rel = Path("plans") / row["key"] / "evidence" / ekey
        tmp = self.root / "plans" / row["key"] / "evidence" / f".{ekey}.tmp"
        tmp.mkdir(parents=True)
        try:
            atomic_text(tmp / "doc.json", text)
            arrays_sha = None
            if arrays:
                atomic_npz(tmp / "arrays.npz", {str(k): np.asarray(v) for k, v in arrays.items()})
                arrays_sha = sha256_file(tmp / "arrays.npz")
            os.replace(tmp, self.root / rel)
            fsync_folder((self.root / rel).parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._tx() as c:
            if c.execute("SELECT 1 FROM plans WHERE key=?", (row["key"],)).fetchone() is None:
                raise PlanNotFoundError(f"plan {row['name']!r} was deleted")
            c.execute("INSERT INTO evidence VALUES (?,?,?,?,?,?,?,?)",
                      (ekey, row["key"], kind, _now(), self.user, str(rel), sha256_bytes(text.encode()), arrays_sha))
            self._audit(c, "evidence", patient_key=row["patient_key"], plan_key=row["key"], kind=kind, evidence=ekey,
                        plan_id=int(row["plan_id"]))
        return ekey

    def evidence(self, ref, kind: str | None = None) -> list[dict]:
        """The plan's evidence, oldest first: key, kind, time, user, doc (and arrays, loaded)."""
        key = self._row(ref)["key"]
        sql = "SELECT * FROM evidence WHERE plan_key=?" + (" AND kind=?" if kind else "") + " ORDER BY time, key"
        out = []
        for r in self._q(sql, (key, kind) if kind else (key,)):
            folder = self.root / r["path"]
            try:
                doc = json.loads((folder / "doc.json").read_text(encoding="utf-8"))
                arrays = None
                if r["arrays_sha256"]:
                    with np.load(folder / "arrays.npz") as z:
                        arrays = {k: z[k] for k in z.files}
            except FileNotFoundError as exc:
                raise StoreIntegrityError(f"evidence {r['key']} ({r['kind']}): {exc.filename} is missing") from None
            out.append({"key": r["key"], "kind": r["kind"], "time": r["time"], "user": r["user"], "doc": doc,
                        "arrays": arrays})
        return out

    def history(self, ref) -> list[dict]:
        """The plan's shaping history, oldest first: one entry per journal line (request,
        undo, redo), with the store's plan ID after it; lines a writer journaled but the
        index has not yet taken are included with ``indexed`` False."""
        row = self._row(ref)
        out = [{"line": r["line"], "op": r["op"], "request_id": r["request_id"], "kind": r["kind"],
                "plan_id": r["plan_id"], "indexed": True, "time": r["indexed"],
                "summary": json.loads(r["summary_json"]) if r["summary_json"] else None}
               for r in self._q("SELECT * FROM requests WHERE plan_key=? ORDER BY line", (row["key"],))]
        try:
            raw = complete_journal(self.root / "plans" / row["key"] / "session")
        except FileNotFoundError:
            raise StoreIntegrityError(f"plan {row['name']!r}: its journal is missing") from None
        if len(raw) > row["journal_bytes"] and sha256_bytes(raw[: row["journal_bytes"]]) == row["journal_sha256"]:
            for ln in parse_lines(raw, row["journal_bytes"], row["n_lines"]):
                out.append({"line": ln.line, "op": ln.op, "request_id": ln.request_id, "kind": ln.kind,
                            "plan_id": None, "indexed": False, "time": None, "summary": ln.summary})
        return out

    def audit(self, ref=None) -> list[dict]:
        """The audit trail (of one plan, or all), oldest first."""
        if ref is None:
            rows = self._q("SELECT * FROM audit ORDER BY id")
        else:
            rows = self._q("SELECT * FROM audit WHERE plan_key=? ORDER BY id", (self._row(ref)["key"],))
        return [{**{k: r[k] for k in ("time", "user", "action", "patient_key", "plan_key")},
                 "detail": json.loads(r["detail_json"])} for r in rows]

    def beams(self, ref) -> list[dict]:
        key = self._row(ref)["key"]
        return [{"name": r["name"], "gantry_deg": r["gantry_deg"], "couch_deg": r["couch_deg"],
                 "collimator_deg": r["collimator_deg"], "isocentre_mm_xyz": json.loads(r["isocentre_mm_xyz"]),
                 "sad_mm": r["sad_mm"], "energy_mv": r["energy_mv"]}
                for r in self._q("SELECT * FROM beams WHERE plan_key=? ORDER BY idx", (key,))]

    def show(self, ref) -> dict:
        """A plan's record: its row, beams, approvals, evidence kinds, history length."""
        row = self._row(ref)
        ev = [{"key": r["key"], "kind": r["kind"], "time": r["time"]}
              for r in self._q("SELECT key, kind, time FROM evidence WHERE plan_key=? ORDER BY time", (row["key"],))]
        parent = self._q("SELECT name FROM plans WHERE key=?", (row["parent_key"],)) if row["parent_key"] else []
        return {"key": row["key"], "name": row["name"], "patient_key": row["patient_key"], "plan_id": row["plan_id"],
                "status": row["status"], "status_evidence": row["status_evidence"],
                "prescription_gy": row["prescription_gy"], "created": row["created"], "modified": row["modified"],
                "parent": parent[0][0] if parent else row["parent_key"], "content_sha256": row["content_sha256"],
                "beams": self.beams(row["key"]), "approvals": self.approvals(row["key"]), "evidence": ev,
                "history_lines": int(row["n_lines"]),
                "requests": self._q("SELECT COUNT(*) FROM requests WHERE plan_key=? AND op='request'",
                                    (row["key"],))[0][0]}

    # ------------------------------------------------------------------ integrity
    def check(self, *, sync: bool = True) -> list[str]:
        """Problems with the store, one sentence each naming the file or plan (empty: sound).

        ``PRAGMA integrity_check`` and ``foreign_key_check``; every indexed file present with
        its recorded SHA-256 (image and structure sets, session files, request files, plan
        files, evidence); every indexed journal prefix unchanged. With ``sync`` each plan's
        index first takes what its journal holds beyond it.
        """
        problems = []
        try:
            res = [r[0] for r in self._q("PRAGMA integrity_check")]
        except StoreError as exc:
            return [str(exc)]
        if res != ["ok"]:
            problems += [f"{self.root / DB_NAME}: {r}" for r in res]
        for r in self._q("PRAGMA foreign_key_check"):
            problems.append(f"{self.root / DB_NAME}: table {r[0]} row {r[1]} refers to a missing {r[2]} row")

        def same(path: Path, sha: str, what: str) -> None:
            try:
                if sha256_file(path) != sha:
                    problems.append(f"{path}: {what} differs from the one indexed (hash mismatch)")
            except FileNotFoundError:
                problems.append(f"{path}: {what} is missing")

        for r in self._q("SELECT path, file_sha256 FROM image_sets"):
            same(self.root / r[0], r[1], "image set file")
        for r in self._q("SELECT path, file_sha256 FROM structure_sets"):
            same(self.root / r[0], r[1], "structure set file")
        keys = [r[0] for r in self._q("SELECT key FROM plans")]
        if sync:
            for key in keys:
                try:
                    with self._tx() as c:
                        self._sync_in(c, key, None)
                except StoreIntegrityError as exc:
                    problems.append(str(exc))
        for key in keys:
            p = self._q("SELECT * FROM plans WHERE key=?", (key,))[0]
            folder = self.root / "plans" / key / "session"
            what = f"plan {p['name']!r}"
            same(folder / "session.json", p["header_sha256"], f"{what}: session file")
            same(folder / "initial_fluences.npz", p["initial_sha256"], f"{what}: starting fluences")
            try:
                raw = (folder / "journal.jsonl").read_bytes()
                if sha256_bytes(raw[: p["journal_bytes"]]) != p["journal_sha256"]:
                    problems.append(f"{folder / 'journal.jsonl'}: {what}: the indexed history was changed")
            except FileNotFoundError:
                problems.append(f"{folder / 'journal.jsonl'}: {what}: journal is missing")
            for r in self._q("SELECT file, file_sha256 FROM requests WHERE plan_key=? AND file IS NOT NULL", (key,)):
                same(folder / "requests" / r[0], r[1], f"{what}: request file")
            for r in self._q("SELECT path, sha256 FROM plan_files WHERE plan_key=?", (key,)):
                same(self.root / "plans" / key / r[0], r[1], f"{what}: plan file")
        for r in self._q("SELECT path, doc_sha256, arrays_sha256, kind FROM evidence"):
            same(self.root / r[0] / "doc.json", r[1], f"evidence ({r[3]}) document")
            if r[2]:
                same(self.root / r[0] / "arrays.npz", r[2], f"evidence ({r[3]}) arrays")
        return problems

    def verify(self) -> None:
        """Raise :class:`StoreIntegrityError` listing the problems :meth:`check` finds."""
        problems = self.check()
        if problems:
            raise StoreIntegrityError(f"{self.root}: {len(problems)} problem(s): " + "; ".join(problems[:20]))

    # ------------------------------------------------------------------ export
    def export_anonymised(self, dest: "str | Path", *, salt: str | None = None, force: bool = False) -> Path:
        """Write a copy of the store to ``dest`` with identifiers replaced.

        Patient IDs become ``ANON-<8 hex>`` (keyed by a secret ``salt``, random by default,
        as :class:`ids_engine.io.Anonymiser` does), names ``ANONYMOUS``, users
        ``user-<8 hex>``; input paths in the sessions' case descriptions (a DICOM folder is
        often named after the patient) are replaced by a hash, and every text file copied
        has any remaining identifier string replaced. The database is rebuilt (VACUUM with
        secure delete), so no old value survives in free pages. Plans whose case was a
        DICOM or matRad file need that (anonymised) case to be reopened.
        """
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            if not force:
                raise StoreError(f"export_anonymised: {dest} exists and is not empty; choose another folder or force")
        salt = salt if salt is not None else secrets.token_hex(16)
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.exporting-"))
        umask = 0o666 & ~file_mode()
        os.chmod(work, 0o777 & ~(umask | (umask & 0o444) >> 2))  # as mkdir would make it, not mkdtemp's 0700
        try:
            db = work / DB_NAME
            with self._lock:
                self._conn.execute("VACUUM INTO ?", (str(db),))
            conn = sqlite3.connect(db, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA secure_delete=ON")
            pseud = lambda prefix, v: f"{prefix}-{hashlib.sha256(f'{salt}|{v}'.encode()).hexdigest()[:8].upper()}"  # noqa: E731
            secrets_map: dict[str, str] = {}
            conn.execute("BEGIN")
            for r in conn.execute("SELECT key, patient_id, name FROM patients").fetchall():
                new_id = pseud("ANON", r["patient_id"])
                secrets_map[r["patient_id"]] = new_id
                if r["name"]:
                    secrets_map[r["name"]] = "ANONYMOUS"
                    for part in re.split(r"[\^ ,]+", r["name"]):
                        if len(part) >= 3:
                            secrets_map.setdefault(part, "ANONYMOUS")
                conn.execute("UPDATE patients SET patient_id=?, name=? WHERE key=?", (new_id, "ANONYMOUS", r["key"]))
            users = {r[0] for t in ("audit", "approvals", "evidence") for r in conn.execute(f"SELECT DISTINCT user FROM {t}")}
            for u in users:
                conn.execute("UPDATE audit SET user=? WHERE user=?", (pseud("user", u), u))
                conn.execute("UPDATE approvals SET user=? WHERE user=?", (pseud("user", u), u))
                conn.execute("UPDATE evidence SET user=? WHERE user=?", (pseud("user", u), u))
                if u:
                    secrets_map.setdefault(u, pseud("user", u))
            for r in conn.execute("SELECT key, name FROM plans").fetchall():
                name = _scrub(r["name"], secrets_map)
                if name != r["name"]:  # a plan named after the patient
                    try:
                        conn.execute("UPDATE plans SET name=? WHERE key=?", (name, r["key"]))
                    except sqlite3.IntegrityError:
                        conn.execute("UPDATE plans SET name=? WHERE key=?", (f"plan {r['key'][:8]}", r["key"]))
            for r in conn.execute("SELECT id, detail_json FROM audit").fetchall():
                conn.execute("UPDATE audit SET detail_json=? WHERE id=?", (_scrub_json(r[1], secrets_map, None), r[0]))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('anonymised', ?)", (_now(),))
            conn.execute("COMMIT")
            self._export_files(conn, work, secrets_map)
            conn.execute("VACUUM")
            conn.close()
            atomic_text(work / MARKER, json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION,
                                                   "anonymised": True}, indent=1) + "\n")
            for sub in ("patients", "plans", ".staging", ".trash"):
                (work / sub).mkdir(exist_ok=True)
            if dest.exists():
                old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
                os.replace(dest, old / "x")
                os.replace(work, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, dest)
            fsync_folder(dest.parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _log.info("exported an anonymised copy of the store")
        return dest

    def _export_files(self, conn, work: Path, secrets_map: dict) -> None:
        """Copy the indexed files into the export (``conn``: the export's database)."""
        for r in conn.execute("SELECT path FROM image_sets UNION ALL SELECT path FROM structure_sets").fetchall():
            (work / r[0]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / r[0], work / r[0])
        for p in conn.execute("SELECT key, journal_bytes FROM plans").fetchall():
            key = p["key"]
            src, dst = self.root / "plans" / key, work / "plans" / key
            (dst / "session" / "requests").mkdir(parents=True)
            doc = json.loads((src / "session" / "session.json").read_text(encoding="utf-8"))
            case = doc.get("case") or {}
            for k in ("dicom", "matrad"):
                if k in case:
                    case[k] = f"anonymised-{hashlib.sha256(str(case[k]).encode()).hexdigest()[:12]}"
            text = _scrub_json(json.dumps(doc), secrets_map)
            (dst / "session" / "session.json").write_text(text, encoding="utf-8")
            shutil.copyfile(src / "session" / "initial_fluences.npz", dst / "session" / "initial_fluences.npz")
            raw = (src / "session" / "journal.jsonl").read_bytes()[: p["journal_bytes"]]
            for ln in parse_lines(raw, 0, 0):
                if ln.file:
                    shutil.copyfile(src / "session" / "requests" / ln.file, dst / "session" / "requests" / ln.file)
            scrubbed = _scrub_journal(raw, secrets_map, f"plan {key}: journal.jsonl")
            (dst / "session" / "journal.jsonl").write_bytes(scrubbed)
            conn.execute("UPDATE plans SET header_sha256=?, journal_sha256=?, journal_bytes=? WHERE key=?",
                         (sha256_bytes(text.encode()), sha256_bytes(scrubbed), len(scrubbed), key))
            for f in conn.execute("SELECT path FROM plan_files WHERE plan_key=?", (key,)).fetchall():
                (dst / f[0]).parent.mkdir(parents=True, exist_ok=True)
                data = (src / f[0]).read_text(encoding="utf-8", errors="replace")
                data = _scrub_json(data, secrets_map) if f[0].endswith(".json") else _scrub(data, secrets_map)
                (dst / f[0]).write_text(data, encoding="utf-8")
                conn.execute("UPDATE plan_files SET sha256=? WHERE plan_key=? AND path=?",
                             (sha256_file(dst / f[0]), key, f[0]))
        for e in conn.execute("SELECT key, path, arrays_sha256 FROM evidence").fetchall():
            (work / e["path"]).mkdir(parents=True, exist_ok=True)
            text = _scrub_json((self.root / e["path"] / "doc.json").read_text(encoding="utf-8"), secrets_map)
            (work / e["path"] / "doc.json").write_text(text, encoding="utf-8")
            conn.execute("UPDATE evidence SET doc_sha256=? WHERE key=?", (sha256_bytes(text.encode()), e["key"]))
            if e["arrays_sha256"]:
                shutil.copyfile(self.root / e["path"] / "arrays.npz", work / e["path"] / "arrays.npz")


def _scrub(text: str, secrets_map: dict) -> str:
    """Replace identifier strings in a text file: whole words only (never inside a longer
    word or number), identifiers of 3 or more characters (shorter ones only as whole JSON
    values: see :func:`_scrub_json`)."""
    for old in sorted(secrets_map, key=len, reverse=True):
        if len(old) >= 3:
            text = re.sub(r"(?<![0-9A-Za-z])" + re.escape(old) + r"(?![0-9A-Za-z])",
                          lambda _m, new=secrets_map[old]: new, text)
    return text


def _scrub_value(v, secrets_map: dict):
    """A parsed JSON value with identifiers replaced in its string values only (keys, numbers
    and structure untouched)."""
    if isinstance(v, str):
        return secrets_map[v] if v in secrets_map else _scrub(v, secrets_map)
    if isinstance(v, list):
        return [_scrub_value(x, secrets_map) for x in v]
    if isinstance(v, dict):
        return {k: _scrub_value(x, secrets_map) for k, x in v.items()}
    return v


def _scrub_json(text: str, secrets_map: dict, indent: int | None = 1) -> str:
    """A JSON document with identifiers replaced in its string values (see :func:`_scrub_value`)."""
    return json.dumps(_scrub_value(json.loads(text), secrets_map), indent=indent)


def _scrub_journal(raw: bytes, secrets_map: dict, where: str) -> bytes:
    """A session journal (one JSON entry per line) with identifiers replaced in its string
    values; refuses to write one that would parse to fewer entries than the original."""
    lines = [ln for ln in raw.split(b"\n") if ln.strip()]
    out = b"".join(json.dumps(_scrub_value(json.loads(ln), secrets_map)).encode("utf-8") + b"\n" for ln in lines)
    if len(parse_lines(out, 0, 0)) != len(parse_lines(raw, 0, 0)):  # pragma: no cover - a guard
        raise StoreError(f"{where}: the anonymised journal would not replay; export stopped")
    return out


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no login name (containers)
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"
