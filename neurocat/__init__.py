"""neurocat: dataset-scale CNN interpretability on Prefect and Dask."""

__version__ = "0.1.0"
