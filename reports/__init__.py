"""Static HTML reports built from a store alone (reads storage, never writes the store)."""
