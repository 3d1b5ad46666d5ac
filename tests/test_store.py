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


def test_csv_keeps_file_names_with_line_breaks_in_one_row(tmp_path):
    """A carriage return in a file name was written unquoted: readers split the row in two."""
    import csv

    import pandas as pd

    from storage.files import write_csv

    df = pd.DataFrame({"path": ["a/cr\rret.jpg", "b/lf\nfeed.jpg", "c/plain.jpg"], "prob": [0.5, 0.25, 1.0]})
    path = write_csv(tmp_path / "t.csv", df)
    assert pd.read_csv(path)["path"].tolist() == df["path"].tolist()
    with open(path, newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)][1:] == df["path"].tolist()

