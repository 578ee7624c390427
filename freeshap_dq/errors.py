"""Exceptions with messages meant for people: what is wrong, where, and what to do."""

from __future__ import annotations


class FreeShapError(Exception):
    """Base class for every error freeshap-dq raises on purpose."""


class InputError(FreeShapError, ValueError):
    """Bad user input: a file, an array, a label, an option."""


class KernelError(InputError):
    """A kernel that cannot be used: wrong shape, NaN, not symmetric, not positive semidefinite."""


class CheckpointError(FreeShapError):
    """A checkpoint that does not belong to this run or cannot be read."""
