# -*- test-case-name: tests.test_backends -*-
"""Errors raised outside the wire codec: misconfiguration the operator must fix."""

from __future__ import annotations

__all__ = ["BackendSpecError", "UnknownBackendScheme"]


class BackendSpecError(ValueError):
    """A ``--backend SCHEME:SPEC`` string is wrong or names a disk that cannot be opened."""


class UnknownBackendScheme(BackendSpecError):
    """No installed backend plugin has the scheme a ``--backend`` string names."""
