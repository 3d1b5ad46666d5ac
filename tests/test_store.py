"""The zarr store's listing order."""

import numpy as np

from storage.store import Store


def test_groups_and_arrays_list_numbers_in_numeric_order(tmp_path):
    """Layers come out in network order (`_blocks.5` before `_blocks.10`), as the report lists them."""
    store = Store(tmp_path / "s.zarr")
    for layer in ("_blocks.10", "_conv_head", "_blocks.5", "_blocks.15", "_blocks.1"):
        store.write_array(f"catalog/{layer}/top_index", np.zeros((2, 2), np.int64))
    for name in ("map10", "map9", "map100"):
        store.write_array(f"catalog/{name}", np.zeros(1))
    assert store.groups("catalog") == ["_blocks.1", "_blocks.5", "_blocks.10", "_blocks.15", "_conv_head"]
    assert store.arrays("catalog") == ["map9", "map10", "map100"]


def test_natural_order_takes_any_name():
    """Numeric order without int(): leading zeros, ties, and digit runs too long for int()."""
    from storage.store import natural_key

    names = ["u10", "u9", "u010", "u0", "x" + "9" * 5000, "x" + "1" + "0" * 4999, "x" + "8" * 4999, "u", "10a"]
    assert sorted(names, key=natural_key) == ["10a", "u", "u0", "u9", "u010", "u10",
                                              "x" + "8" * 4999, "x" + "1" + "0" * 4999, "x" + "9" * 5000]
