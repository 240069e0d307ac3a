"""Hash dictionary backends behind one interface (see base.Store)."""

from dedupd.store.base import (
    ImageRecord,
    Match,
    QuarantineEntry,
    Store,
    StoreError,
    open_store,
)

__all__ = ["ImageRecord", "Match", "QuarantineEntry", "Store", "StoreError", "open_store"]
