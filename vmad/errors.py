"""The one base class for "the input is wrong" errors (bad file, bundle, config, checkpoint).

`vmad` prints such an error's message and exits with status 2 instead of a traceback:
the message already names the file and the problem.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input named by its message; raised by readers and loaders across the project."""


class UsageError(Exception):
    """A problem with what the user asked for (bad file, bad option): printed, exit code 2."""
