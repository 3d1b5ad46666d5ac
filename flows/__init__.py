"""Prefect flows, one module per job. Flows plan work, fan it out, reduce, and call reports."""

from engine.memory import tune_malloc

# Before any flow module imports pandas, whose import starts a thread that gets an arena of its
# own: with a second arena in place the cap no longer keeps task threads on the main one, and
# their batch-sized activations are mapped afresh every batch (engine/memory.py).
tune_malloc()
