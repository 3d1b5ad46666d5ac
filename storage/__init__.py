"""The only code that opens files for writing: zarr store, manifests, markers, locks."""

from storage.store import Store, StoreLockedError, fingerprint

__all__ = ["Store", "StoreLockedError", "fingerprint"]
