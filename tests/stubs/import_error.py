"""Stub trainer: imports a module that does not exist."""

import autoresearch_no_such_module  # noqa: F401
