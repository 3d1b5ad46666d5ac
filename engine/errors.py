"""Errors a user can act on: the CLI prints them as one line and exits 2."""


class InputError(Exception):
    """Bad arguments or unusable input (missing file, wrong weights, undecodable query)."""
