"""Errors the engine raises on purpose, and the process exit codes they map to."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of the ``entropymerge`` command."""

    OK = 0
    INTERNAL_ERROR = 1
    BAD_INPUT = 2
    CASES_FAILED = 3  # a batch ran to the end, but some cases failed
    CANCELLED = 130


class UserInputError(Exception):
    """A problem with what the user gave us (files, options), explained in one sentence.

    The CLI prints the message without a traceback and exits with ``ExitCode.BAD_INPUT``.
    """


class CodeExecutionRefused(UserInputError):
    """A site model would need its own Python code to run, and the user has not trusted it."""


class Cancelled(Exception):
    """The user asked the running job to stop."""
