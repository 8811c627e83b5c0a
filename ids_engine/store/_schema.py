"""The plan store's SQLite schema (version 1)."""

from __future__ import annotations

SCHEMA_VERSION = 1
FORMAT = "ids-engine plan store"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    key TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE,
    name TEXT,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS image_sets (
    key TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL REFERENCES patients(key) ON DELETE CASCADE,
    ct_sha256 TEXT NOT NULL,
    grid_json TEXT NOT NULL,
    path TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (patient_key, ct_sha256));
CREATE TABLE IF NOT EXISTS structure_sets (
    key TEXT PRIMARY KEY,
    image_set_key TEXT NOT NULL REFERENCES image_sets(key) ON DELETE CASCADE,
    structures_json TEXT NOT NULL,
    path TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    key TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL REFERENCES patients(key),
    name TEXT NOT NULL,
    image_set_key TEXT REFERENCES image_sets(key),
    parent_key TEXT,
    plan_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_evidence TEXT,
    prescription_gy REAL NOT NULL,
    created TEXT NOT NULL,
    modified TEXT NOT NULL,
    header_sha256 TEXT NOT NULL,
    initial_sha256 TEXT NOT NULL,
    journal_bytes INTEGER NOT NULL,
    journal_sha256 TEXT NOT NULL,
    n_lines INTEGER NOT NULL,
    last_line_plan_id INTEGER,
    content_sha256 TEXT,
    dose_sha256 TEXT,
    content_at_bytes INTEGER,
    UNIQUE (patient_key, name));
CREATE TABLE IF NOT EXISTS beams (
    plan_key TEXT NOT NULL REFERENCES plans(key) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    gantry_deg REAL, couch_deg REAL, collimator_deg REAL,
    isocentre_mm_xyz TEXT, sad_mm REAL, energy_mv REAL,
    PRIMARY KEY (plan_key, idx));
CREATE TABLE IF NOT EXISTS requests (
    plan_key TEXT NOT NULL REFERENCES plans(key) ON DELETE CASCADE,
    line INTEGER NOT NULL,
    end_bytes INTEGER NOT NULL,
    op TEXT NOT NULL,
    request_id INTEGER,
    kind TEXT,
    file TEXT,
    file_sha256 TEXT,
    session_plan_id INTEGER,
    plan_id INTEGER NOT NULL,
    summary_json TEXT,
    fluence_sha256 TEXT,
    dose_sha256 TEXT,
    indexed TEXT NOT NULL,
    PRIMARY KEY (plan_key, line));
CREATE TABLE IF NOT EXISTS plan_files (
    plan_key TEXT NOT NULL REFERENCES plans(key) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (plan_key, path));
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_key TEXT NOT NULL,
    user TEXT NOT NULL,
    time TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    plan_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    key TEXT PRIMARY KEY,
    plan_key TEXT NOT NULL REFERENCES plans(key) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    path TEXT NOT NULL,
    doc_sha256 TEXT NOT NULL,
    arrays_sha256 TEXT);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_key TEXT,
    plan_key TEXT,
    detail_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS plans_by_patient ON plans (patient_key);
CREATE INDEX IF NOT EXISTS audit_by_plan ON audit (plan_key);
"""
