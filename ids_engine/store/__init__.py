"""The plan store: patients, image sets, structure sets, plans with their shaping history,
approvals, evidence and an audit trail, in one folder (SQLite in WAL mode + session
folders + arrays). See :mod:`ids_engine.store._store` for the design and its crash safety.

>>> from ids_engine.store import PlanStore
>>> with PlanStore.open() as store:                      # doctest: +SKIP
...     pk = store.add_patient(patient, patient_id="12345", name="Doe^Jane")
...     ref = store.import_session("out/session", patient_key=pk, plan_name="plan A")
...     s = store.load_session(ref)                        # journals into the store
"""

from ._store import (
    STATUSES,
    ApprovedPlanError,
    NotAStoreError,
    PlanNotFoundError,
    PlanOpenElsewhereError,
    PlanRef,
    PlanStore,
    StoreError,
    StoreIntegrityError,
    content_hash,
    default_store_path,
    dose_hash,
)

__all__ = ["ApprovedPlanError", "NotAStoreError", "PlanNotFoundError", "PlanOpenElsewhereError", "PlanRef",
           "PlanStore", "STATUSES", "StoreError", "StoreIntegrityError", "content_hash", "default_store_path",
           "dose_hash"]
