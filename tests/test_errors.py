"""The error hierarchy: request errors carry the contract's status and code,
the others never reach HTTP, and ``crushd serve`` reports them in one line."""

from __future__ import annotations

import socket

from conftest import make_config
from helpers import serve_once

from crushd import errors
from crushd.app import create_app
from crushd.errors import CrushdError, RequestError, StartupError, StoreBusy

# The status table of SPEC §3, as (status, code) for every request error.
CONTRACT = {
    "InvalidRequest": (400, "invalid_request"),
    "Unauthorized": (401, "unauthorized"),
    "Forbidden": (403, "forbidden"),
    "NotFound": (404, "not_found"),
    "WorkspaceClosing": (409, "workspace_closing"),
    "SessionBusy": (409, "session_busy"),
    "RunIdConflict": (409, "run_id_conflict"),
    "StoreClosed": (409, "workspace_closing"),
    "QueueFull": (429, "queue_full"),
    "ShuttingDown": (503, "shutting_down"),
    "TooManyStreams": (503, "too_many_streams"),
    "StorageUnavailable": (503, "storage_unavailable"),
    "StoreBusy": (503, "storage_unavailable"),
    # Checkpoints (SPEC §5; README.rst "Checkpoints")
    "CheckpointClosed": (409, "workspace_closing"),
    "WorkspaceChanged": (409, "workspace_changed"),
    "RestoreBlocked": (409, "restore_blocked"),
    "CheckpointsDisabled": (409, "checkpoints_disabled"),
    "NothingToRevert": (409, "nothing_to_revert"),
    "CheckpointExpired": (410, "checkpoint_expired"),
    "DiffTooLarge": (422, "diff_too_large"),
}


def test_request_errors_carry_the_contract_status_and_code():
    found = {
        name: (cls.status, cls.code)
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, RequestError) and not name.startswith("_")
    }
    del found["RequestError"]
    assert found == CONTRACT
    for name, (status, _) in CONTRACT.items():
        retry = getattr(errors, name)("x").headers().get("Retry-After")
        assert (retry is not None) == (status == 503), name


def test_errors_that_never_reach_http_are_not_request_errors():
    for cls in (
        errors.StartupError,
        errors.ConfigError,
        errors.AlreadyRunning,
        errors.SchemaTooNew,
        errors.ProviderError,
    ):
        assert issubclass(cls, CrushdError) and not issubclass(cls, RequestError), cls
        assert not hasattr(cls, "status") or cls is errors.ProviderError
    for cls in (errors.ConfigError, errors.AlreadyRunning, errors.SchemaTooNew):
        assert issubclass(cls, StartupError)
    failed = errors.ProviderError("Too many steps", "stopped after 3")
    assert failed.message == "Too many steps: stopped after 3" and failed.status is None


def test_workspace_changed_lists_the_files_in_the_error(tmp_path):
    app = create_app(make_config(tmp_path))

    @app.get("/v1/test-changed")
    def changed():
        raise errors.WorkspaceChanged(["src/b.py", "a.txt"])

    response = app.test_client().get("/v1/test-changed")
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "workspace_changed" and error["files"] == ["a.txt", "src/b.py"]
    assert "a.txt, src/b.py" in error["message"]
    app.extensions["crushd"].stop()


def test_a_busy_database_answers_503_storage_unavailable(tmp_path):
    app = create_app(make_config(tmp_path))

    @app.get("/v1/test-busy")
    def busy():
        raise StoreBusy("database workspace.db is busy")

    response = app.test_client().get("/v1/test-busy")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.get_json() == {
        "error": {"code": "storage_unavailable", "message": "database workspace.db is busy"}
    }
    app.extensions["crushd"].stop()


def test_serve_reports_an_address_in_use_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_once(tmp_path / "data", "--port", str(port))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crushd: cannot listen on 127.0.0.1:{port}: "), done.stderr
    assert "Traceback" not in done.stderr


def test_serve_reports_an_unusable_data_directory_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = serve_once(blocker / "data", "--port", "0")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crushd: cannot use the data directory {blocker / 'data'}"), done.stderr
    assert "Traceback" not in done.stderr
