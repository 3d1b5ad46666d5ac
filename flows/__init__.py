"""Prefect flows, one module per job. Flows plan work, fan it out, reduce, and call reports."""
