"""Every error crushd raises on purpose, in one module and two families.

* :class:`RequestError` and its subclasses end an HTTP request.  Each has
  the status and the stable ``code`` of the contract's error table;
  :mod:`crushd.app` turns them into ``{"error": {"code", "message"}}`` in
  one place.
* The others never reach HTTP.  :class:`StartupError` (bad configuration,
  a data directory in use, a database from a newer crushd, an address that
  cannot be bound) stops the daemon before it serves; :class:`ProviderError`
  (a model request failed) ends a run ``failed`` with the error in its
  record.

:class:`CrushdError` is the base of both; ``crushd serve`` catches it and
prints its message.  Every class has a stable snake_case ``code`` (for the
JSON error, for logs and for tests); only request errors have a ``status``.
"""

from __future__ import annotations


class CrushdError(Exception):
    """Base of every deliberate crushd error; ``message`` is for people."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- errors that end an HTTP request -------------------------------------------


class RequestError(CrushdError):
    """An error a request ends with: ``status``, ``code``, ``headers()`` and
    ``details()``, fields added to the JSON ``error`` object beside ``code``
    and ``message`` (``files`` of :class:`WorkspaceChanged`)."""

    status = 500

    def headers(self) -> dict[str, str]:
        return {}

    def details(self) -> dict[str, object]:
        return {}


class _RetryLater(RequestError):
    """A 503: the client may retry the same request in a few seconds."""

    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_request"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class WorkspaceClosing(RequestError):
    status = 409
    code = "workspace_closing"


class SessionBusy(RequestError):
    status = 409
    code = "session_busy"


class RunIdConflict(RequestError):
    status = 409
    code = "run_id_conflict"


class QueueFull(RequestError):
    status = 429
    code = "queue_full"


class ShuttingDown(_RetryLater):
    code = "shutting_down"


class TooManyStreams(_RetryLater):
    code = "too_many_streams"


class StorageUnavailable(_RetryLater):
    """The database refuses writes: disk full, locked by another process past
    the busy timeout, an I/O error.  Nothing was written; retrying later may
    succeed (the workspace keeps trying on its own)."""

    code = "storage_unavailable"


class StoreBusy(StorageUnavailable):
    """The store's lock was not free within the caller's budget (another
    thread of ours is inside a slow database call)."""


class StoreClosed(WorkspaceClosing):
    """A database was used after its workspace closed it.

    To a client that is a request racing the workspace's close, so it
    answers 409 ``workspace_closing`` as the contract says; the class of its
    own tells a log (and a test) which of the two happened.
    """


# -- checkpoints -----------------------------------------------------------------
#
# The store's own errors (crushd.checkpoints and the modules beneath it) are
# CheckpointError; those a request can end with are request errors too.


class CheckpointError(CrushdError):
    """Base of every checkpoint store error; one that is not also a request
    error is a fault of the store (git failed), a 500 if a request meets it."""

    code = "checkpoint_error"


class CheckpointClosed(CheckpointError, WorkspaceClosing):
    """The checkpoint store was closed (its workspace is closing); nothing
    more runs.  To a request racing the close, 409 ``workspace_closing``."""

    code = "workspace_closing"


class WorkspaceChanged(RequestError, CheckpointError):
    """Files to restore differ from what crushd last recorded, or another
    session's run changed them since; nothing was written.

    ``paths`` lists them, and the JSON error carries them as ``files``: the
    client may look, then retry with ``"force": true``.
    """

    status = 409
    code = "workspace_changed"

    def __init__(self, paths: list[str] | tuple[str, ...]) -> None:
        self.paths = sorted(paths)
        shown = ", ".join(self.paths[:10])
        more = f" and {len(self.paths) - 10} more" if len(self.paths) > 10 else ""
        super().__init__(
            f"changed since crushd recorded them: {shown}{more} "
            '(look at them, then send "force": true to overwrite them)'
        )

    def details(self) -> dict[str, object]:
        return {"files": self.paths}


class RestoreBlocked(RequestError, CheckpointError):
    """Something in the workspace stands where a restore must write (a link,
    a directory with files in it); force does not help, nothing was written."""

    status = 409
    code = "restore_blocked"


class DiffTooLarge(RequestError, CheckpointError):
    """The diff is longer than its bound; a stat (``?stat=1``) or one tool
    call's diff still works."""

    status = 422
    code = "diff_too_large"


class CheckpointsDisabled(RequestError):
    """The workspace records no checkpoints (``--no-checkpoints``,
    ``checkpoints = false``, or a work tree that must not be recorded)."""

    status = 409
    code = "checkpoints_disabled"


class CheckpointExpired(RequestError):
    """The checkpoints a diff or revert needs were pruned by retention."""

    status = 410
    code = "checkpoint_expired"


class NothingToRevert(RequestError):
    """A revert whose messages are all reverted already, or an unrevert with
    no revert in force."""

    status = 409
    code = "nothing_to_revert"


# -- errors that never reach HTTP ----------------------------------------------


class StartupError(CrushdError):
    """The daemon cannot start; the message says why and what to do."""

    code = "startup_failed"


class ConfigError(StartupError):
    """The configuration (flags, ``CRUSHD_*``, the TOML file) is not valid."""

    code = "invalid_config"


class AlreadyRunning(StartupError):
    """Another crushd process holds the data directory's lock."""

    code = "already_running"


class SchemaTooNew(StartupError):
    """A database was written by a newer crushd than this one."""

    code = "schema_too_new"


class ProviderError(CrushdError):
    """A model request failed.

    ``title`` is a short human message (the finish part's ``message``),
    ``details`` the provider's own error text (the finish part's ``details``
    and the run's ``error``).  ``retryable`` says whether the same request
    may succeed later (overload, rate limit, a dropped connection);
    ``retry_after`` is the wait in seconds the provider demanded, if any;
    ``status`` the HTTP status when there was one; ``context_too_long``
    marks a prompt the model cannot take (never retried as is).
    """

    code = "provider_error"

    def __init__(
        self,
        title: str,
        details: str = "",
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
        context_too_long: bool = False,
    ) -> None:
        super().__init__(f"{title}: {details}" if details else title)
        self.title = title
        self.details = details
        self.retryable = retryable and not context_too_long
        self.retry_after = retry_after
        self.status = status
        self.context_too_long = context_too_long
