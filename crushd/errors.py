"""The error hierarchy; ``crushd.app`` maps it to the JSON error shape."""

from __future__ import annotations


class CrushdError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(CrushdError):
    status = 400
    code = "invalid_request"


class Unauthorized(CrushdError):
    status = 401
    code = "unauthorized"


class Forbidden(CrushdError):
    status = 403
    code = "forbidden"


class NotFound(CrushdError):
    status = 404
    code = "not_found"


class WorkspaceClosing(CrushdError):
    status = 409
    code = "workspace_closing"


class SessionBusy(CrushdError):
    status = 409
    code = "session_busy"


class RunIdConflict(CrushdError):
    status = 409
    code = "run_id_conflict"


class QueueFull(CrushdError):
    status = 429
    code = "queue_full"


class ShuttingDown(CrushdError):
    status = 503
    code = "shutting_down"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class TooManyStreams(CrushdError):
    status = 503
    code = "too_many_streams"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class StoreClosed(CrushdError):
    """A database was used after its workspace closed it."""

    status = 409
    code = "workspace_closing"


class SchemaTooNew(CrushdError):
    """A database was written by a newer crushd than this one."""

    code = "schema_too_new"
