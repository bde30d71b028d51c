"""The command line's own error: a value given on the command line that cannot be used.

Its own module, below the parser helpers (:mod:`api.cli.options`) and every subcommand, so that
all of them raise it without importing the package that runs them (:mod:`api.cli`).
"""

from __future__ import annotations


class UsageError(Exception):
    """A command-line value that cannot be used; reported with exit status 2."""
