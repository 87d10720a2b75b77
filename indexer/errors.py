"""The indexer's exception types.

Every error the storage layer raises on purpose derives from IndexStoreError, so a caller
(the CLI) can turn any of them into one clear line. Names avoid the builtins (IndexError).
"""

from __future__ import annotations


class IndexStoreError(Exception):
    """Something about an index on disk is wrong or cannot be done; the message says what."""


class SchemaTooNewError(IndexStoreError):
    """The index database was written by a newer pvl-search (its schema revision is unknown)."""


class ModelMismatchError(IndexStoreError):
    """The model asked for is not the model the index was built with."""


class RowStoreError(IndexStoreError):
    """A row store file is not what the caller expects (width, dtype, owner) or is damaged."""


class IndexLockedError(IndexStoreError):
    """Another process has the index open for writing."""
