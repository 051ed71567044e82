"""schemathesis runs crushd's OpenAPI document against a real ``crushd serve``
(``--checks all``): schema-valid requests are accepted, invalid ones refused
with the documented errors, and every response — event streams included —
matches the document, so the two cannot drift.  Generation is seeded and
deterministic, so a failure here is reproducible with the printed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import register

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_the_openapi_document_matches_the_server(daemon_factory, project, tmp_path):
    daemon = daemon_factory()
    with daemon.client() as http:
        wid = register(http, project)
    schemathesis = Path(sys.executable).with_name("schemathesis")
    argv = [
        str(schemathesis),
        "--no-color",
        "--config-file",
        str(CONFIG),
        "run",
        f"{daemon.url}/v1/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "10",
        "--seed",
        "1",
        "--generation-deterministic",
        "--request-timeout",
        "5",
        # One worker: CPython 3.11 can fail compiling in parallel threads
        # ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
    ]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # its report directory and cache land here
        env={**os.environ, "CRUSHD_WORKSPACE_ID": wid},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Tested: 32" in done.stdout, done.stdout[-3000:]
