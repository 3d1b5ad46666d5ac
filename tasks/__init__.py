"""Thin Prefect tasks: URIs and shard ids in, engine/ calls, storage/ writes, small results out."""
