"""The packaged OpenAPI document is valid and describes every route of SPEC §3."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
from openapi_spec_validator import validate

import crushd
from crushd.common import RUN_STATUSES
from crushd.events import EventType
from crushd.mcp import STATUSES
from crushd.providers import FINISH_REASONS

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
ERROR_REF = "#/components/schemas/Error"

# Every route of SPEC §3, written out from the SPEC rather than derived from the document.
SPEC_ROUTES = {
    ("get", "/v1/health"),
    ("get", "/v1/version"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/models"),
    ("post", "/v1/workspaces"),
    ("get", "/v1/workspaces"),
    ("get", "/v1/workspaces/{id}"),
    ("delete", "/v1/workspaces/{id}"),
    ("post", "/v1/workspaces/{id}/sessions"),
    ("get", "/v1/workspaces/{id}/sessions"),
    ("get", "/v1/workspaces/{id}/sessions/{sid}"),
    ("put", "/v1/workspaces/{id}/sessions/{sid}"),
    ("delete", "/v1/workspaces/{id}/sessions/{sid}"),
    ("get", "/v1/workspaces/{id}/sessions/{sid}/messages"),
    ("post", "/v1/workspaces/{id}/agent"),
    ("get", "/v1/workspaces/{id}/runs"),
    ("get", "/v1/workspaces/{id}/runs/{run_id}"),
    ("post", "/v1/workspaces/{id}/runs/{run_id}/cancel"),
    ("post", "/v1/workspaces/{id}/sessions/{sid}/cancel"),
    ("get", "/v1/workspaces/{id}/sessions/{sid}/queue"),
    ("delete", "/v1/workspaces/{id}/sessions/{sid}/queue"),
    ("post", "/v1/workspaces/{id}/sessions/{sid}/compact"),
    ("get", "/v1/workspaces/{id}/events"),
    ("get", "/v1/workspaces/{id}/permissions"),
    ("post", "/v1/workspaces/{id}/permissions/{pid}"),
    ("get", "/v1/workspaces/{id}/mcp"),
    # SPEC §5 "Checkpoints"
    ("get", "/v1/workspaces/{id}/runs/{run_id}/diff"),
    ("post", "/v1/workspaces/{id}/sessions/{sid}/revert"),
    ("post", "/v1/workspaces/{id}/sessions/{sid}/unrevert"),
    ("post", "/v1/workspaces/{id}/sessions/{sid}/fork"),
    # SPEC §4 "Console and metrics"
    ("get", "/"),
    ("post", "/v1/login"),
    ("post", "/v1/logout"),
    ("get", "/metrics"),
}

# Routes that need no token: the health check, the console page, signing in and out.
OPEN_ROUTES = {"/v1/health", "/", "/v1/login", "/v1/logout"}

# The status table of SPEC §3.
SPEC_ERROR_CODES = {
    "invalid_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "workspace_closing",
    "session_busy",
    "run_id_conflict",
    "too_large",
    "queue_full",
    "shutting_down",
    "too_many_streams",
    "storage_unavailable",
    # SPEC §5 "Checkpoints", and the refusals README.rst "Checkpoints" adds
    "workspace_changed",
    "restore_blocked",
    "checkpoints_disabled",
    "nothing_to_revert",
    "checkpoint_expired",
    "diff_too_large",
}

# Error statuses whose body is deliberately not an Error: health reports "stopping".
NON_ERROR_BODIES = {("get", "/v1/health", "503"): "#/components/schemas/Health"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads((files("crushd") / "openapi.json").read_text(encoding="utf-8"))


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def _resolve(spec: dict, obj: dict) -> dict:
    """Follow a local ``$ref`` chain (``#/components/...``) to the object it names."""
    while "$ref" in obj:
        target = spec
        for key in obj["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        obj = target
    return obj


def _json_schema(spec: dict, response: dict) -> dict | None:
    media = _resolve(spec, response).get("content", {}).get("application/json")
    return None if media is None else media.get("schema")


def test_document_is_valid_openapi_3_1(spec):
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_every_spec_route_is_documented(spec):
    documented = {(method, path) for method, path, _ in _operations(spec)}
    missing = SPEC_ROUTES - documented
    extra = documented - SPEC_ROUTES
    assert not missing, f"routes of SPEC §3 missing from openapi.json: {sorted(missing)}"
    assert not extra, f"routes in openapi.json that SPEC §3 does not list: {sorted(extra)}"
    assert len(SPEC_ROUTES) == 34


def test_info_version_matches_package(spec):
    assert spec["info"]["version"] == crushd.__version__


def test_operation_ids_are_present_and_unique(spec):
    ids = []
    for method, path, operation in _operations(spec):
        assert operation.get("operationId"), f"{method.upper()} {path} has no operationId"
        ids.append(operation["operationId"])
    assert len(ids) == len(set(ids)), "duplicate operationId"


def test_every_error_response_references_error_schema(spec):
    checked = set()
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if status != "default" and int(status) < 400:
                continue
            schema = _json_schema(spec, response)
            expected = NON_ERROR_BODIES.get((method, path, status), ERROR_REF)
            assert schema == {"$ref": expected}, (
                f"{method.upper()} {path} {status} does not reference {expected}"
            )
            checked.add((method, path, status))
    assert set(NON_ERROR_BODIES) <= checked


def test_error_code_enum_is_the_spec_status_table(spec):
    code = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    # internal_error is the 500 code of crushd.errors.CrushdError, outside the table.
    assert set(code["enum"]) == SPEC_ERROR_CODES | {"internal_error"}


def test_error_examples_match_their_code(spec):
    for name, response in spec["components"]["responses"].items():
        examples = response["content"]["application/json"].get("examples", {})
        assert examples, f"response {name} has no example"
        for key, example in examples.items():
            assert example["value"]["error"]["code"] == key
            assert key in SPEC_ERROR_CODES


def test_security_is_global_bearer_or_cookie_except_open_routes(spec):
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    cookie = spec["components"]["securitySchemes"]["cookieAuth"]
    assert (cookie["type"], cookie["in"], cookie["name"]) == ("apiKey", "cookie", "crushd_session")
    assert {"bearerAuth": []} in spec["security"]
    assert {"cookieAuth": []} in spec["security"]
    for method, path, operation in _operations(spec):
        if path in OPEN_ROUTES:
            assert operation["security"] == []
        else:
            assert "security" not in operation, f"{method.upper()} {path} overrides security"
            assert "401" in operation["responses"], f"{method.upper()} {path} lacks 401"


def test_every_operation_documents_the_browser_guard(spec):
    for method, path, operation in _operations(spec):
        response = _resolve(spec, operation["responses"].get("403", {}))
        examples = response.get("content", {}).get("application/json", {}).get("examples", {})
        assert "forbidden" in examples, f"{method.upper()} {path} lacks 403 forbidden"


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/workspaces", {"200", "201", "400"}),
        ("delete", "/v1/workspaces/{id}", {"204", "404"}),
        ("delete", "/v1/workspaces/{id}/sessions/{sid}", {"409"}),
        ("post", "/v1/workspaces/{id}/agent", {"200", "202", "409", "429", "503"}),
        ("post", "/v1/workspaces/{id}/runs/{run_id}/cancel", {"200", "202"}),
        ("post", "/v1/workspaces/{id}/sessions/{sid}/compact", {"202", "400", "404", "503"}),
        ("get", "/v1/workspaces/{id}/events", {"200", "503"}),
        ("post", "/v1/workspaces/{id}/permissions/{pid}", {"200", "404"}),
        ("get", "/v1/health", {"200", "503"}),
        ("post", "/v1/login", {"204", "400", "401", "403"}),
        ("post", "/v1/logout", {"204", "403"}),
        ("get", "/metrics", {"200", "401", "403"}),
        ("get", "/v1/workspaces/{id}/runs/{run_id}/diff", {"200", "404", "409", "410", "422"}),
        ("post", "/v1/workspaces/{id}/sessions/{sid}/revert", {"200", "400", "404", "409", "410"}),
        ("post", "/v1/workspaces/{id}/sessions/{sid}/unrevert", {"200", "404", "409", "410"}),
        ("post", "/v1/workspaces/{id}/sessions/{sid}/fork", {"201", "404", "409"}),
    ],
)
def test_spec_status_codes(spec, method, path, statuses):
    documented = set(spec["paths"][path][method]["responses"])
    assert statuses <= documented, f"{method.upper()} {path}: missing {statuses - documented}"


def test_revert_409_names_its_refusals_and_the_error_lists_files(spec):
    response = spec["paths"]["/v1/workspaces/{id}/sessions/{sid}/revert"]["post"]["responses"]
    examples = _resolve(spec, response["409"])["content"]["application/json"]["examples"]
    assert {"session_busy", "workspace_changed", "restore_blocked"} <= set(examples)
    assert examples["workspace_changed"]["value"]["error"]["files"]
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    assert error["files"]["items"] == {"type": "string"}


def test_agent_409_names_both_conflict_codes(spec):
    response = spec["paths"]["/v1/workspaces/{id}/agent"]["post"]["responses"]["409"]
    examples = _resolve(spec, response)["content"]["application/json"]["examples"]
    assert set(examples) == {"run_id_conflict", "workspace_closing"}


def test_events_stream_shape(spec):
    operation = spec["paths"]["/v1/workspaces/{id}/events"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    params = {(p["in"], p["name"]) for p in operation["parameters"]}
    assert {("query", "session_id"), ("query", "since"), ("header", "Last-Event-ID")} <= params
    too_many = _resolve(spec, operation["responses"]["503"])
    assert "Retry-After" in too_many["headers"]
    assert "too_many_streams" in too_many["content"]["application/json"]["examples"]


def test_schema_enums(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["Run"]["properties"]["status"]["enum"] == list(RUN_STATUSES)
    assert set(schemas["FinishPart"]["properties"]["reason"]["enum"]) == set(FINISH_REASONS)
    assert set(schemas["Part"]["discriminator"]["mapping"]) == {
        "text",
        "reasoning",
        "tool_call",
        "tool_result",
        "summary",
        "finish",
    }
    events = set(schemas["Event"]["properties"]["type"]["enum"])
    assert {"reset", "mcp.status", "session.compacted"} <= events
    assert schemas["Run"]["properties"]["kind"]["enum"] == ["prompt", "compact"]
    assert "summary" in schemas["MessageDelta"]["properties"]["kind"]["enum"]
    assert schemas["McpServer"]["properties"]["status"]["enum"] == list(STATUSES)


def test_the_document_states_the_limits_the_server_enforces(spec, client, project):
    """Each limit the views check is in the schema, and the server holds to it
    on both sides of the line."""
    schemas = spec["components"]["schemas"]
    prompt = schemas["PromptRequest"]["properties"]
    (limit,) = [
        p["schema"]
        for p in spec["paths"]["/v1/workspaces/{id}/runs"]["get"]["parameters"]
        if p["name"] == "limit"
    ]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)
    assert prompt["run_id"]["maxLength"] == 128 and "null" in prompt["run_id"]["type"]
    assert schemas["WorkspaceCreate"]["properties"]["path"]["pattern"].startswith("^[/~]")
    for schema in (prompt["prompt"], schemas["SessionUpdate"]["properties"]["title"]):
        assert schema["pattern"] == "\\S"
    assert "null" in schemas["SessionCreate"]["properties"]["title"]["type"]

    assert client.post("/v1/workspaces", json={"path": "relative/dir"}).status_code == 400
    wid = client.post("/v1/workspaces", json={"path": str(project), "yolo": None}).get_json()["id"]
    runs = f"/v1/workspaces/{wid}/runs"
    assert client.get(f"{runs}?limit=1000").status_code == 200
    assert client.get(f"{runs}?limit=1001").status_code == 400
    assert client.get(f"{runs}?limit=0").status_code == 400
    sessions = f"/v1/workspaces/{wid}/sessions"
    assert client.post(sessions, json={"title": None}).status_code == 201
    assert client.post(sessions, json={"title": " \t"}).status_code == 400
    agent = f"/v1/workspaces/{wid}/agent"
    for bad in (
        {"prompt": " "},
        {"prompt": "x", "run_id": "r" * 129},
        {"prompt": "x", "run_id": "a\nb"},
    ):
        assert client.post(agent, json=bad).status_code == 400, bad
    ok = {"prompt": "x", "run_id": "r" * 128, "session_id": None, "model": None}
    assert client.post(agent, json=ok).status_code == 202


def test_the_event_types_are_the_declared_ones(spec):
    """``Event.type`` lists exactly :class:`crushd.events.EventType`."""
    listed = spec["components"]["schemas"]["Event"]["properties"]["type"]["enum"]
    assert sorted(listed) == sorted(t.value for t in EventType)
