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


class DatabaseAccessError(IndexStoreError):
    """The metadata database could not be reached, timed out, or failed a statement (disk
    full, file unreadable, server gone); the message is one line naming the database."""


class IndexReplacedError(IndexStoreError):
    """The index folder or its database was replaced (deleted and restored, rebuilt) while
    open: a reader reopens it instead of mixing the old copy with the new one."""


class NotFoundError(IndexStoreError):
    """The index has no such thing (e.g. a video id); the message says what was asked for."""
