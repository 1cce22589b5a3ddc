"""The project's one family of errors.

Library code raises these; only the CLI turns them into a message on stderr and an exit code.
A crashed training run is not an error: it is data (a status in the record).
"""


class AutoresearchError(Exception):
    """Something the user can fix; the message says what to do next."""

    exit_code = 1


class UsageError(AutoresearchError):
    """Bad command-line input: nothing was written."""

    exit_code = 2


class WorkspaceError(AutoresearchError):
    """The workspace (git repository, files, branch) is not in a state the command can use."""


class DataError(AutoresearchError):
    """Prepared data or tokenizer missing, unreadable or not matching its manifest."""

    exit_code = 2


class AgentError(AutoresearchError):
    """The agent could not produce a proposal (endpoint dead, no valid reply after retries)."""


class BaselineCrashed(AutoresearchError):
    """train.py as committed produced no measurement: a session has nothing to compare with.
    The crash is recorded (it is data); the session ends with this error once it is."""

    exit_code = 3


class EditError(AutoresearchError):
    """A proposed edit could not be applied; the message is written for the model to read."""
