"""``crushd diff``, ``crushd revert``, ``crushd unrevert`` and ``crushd fork``:
the checkpoint commands of the client (see :mod:`crushd.reverts`).

They find the run or session in ``--workspace``, else in the current
directory's workspace, else in every registered one, as ``crushd cancel``
does, and never register a directory.  A refused revert prints why; for
``workspace_changed`` also the files, one per line on stderr, and that
``--force`` overwrites them.
"""

from __future__ import annotations

import os
from typing import Any

import click

from crushd.cli import (
    api_json_option,
    client_options,
    connected,
    resolve_workspace,
    workspace_option,
)
from crushd.terminal import fail, print_json, print_table


def _candidates(client: Any, workspace_arg: str | None) -> list[dict[str, Any]]:
    if workspace_arg:
        return [resolve_workspace(client, workspace_arg)]
    here = os.path.realpath(os.getcwd())
    return sorted(client.workspaces(), key=lambda w: w["path"] != here)


def find_workspace_of(client: Any, kind: str, item_id: str, workspace_arg: str | None) -> str:
    """The id of the workspace holding the run or session ``item_id``."""
    from crushd.client import ApiError, ClientError

    for workspace in _candidates(client, workspace_arg):
        try:
            client.request("GET", f"/v1/workspaces/{workspace['id']}/{kind}s/{item_id}")
        except ApiError as exc:
            if exc.status in (404, 409):  # not there, or a workspace not open
                continue
            raise
        return workspace["id"]
    raise ClientError(f"{kind} {item_id} not found")


def _refused(exc: Any) -> None:
    """Say why a revert was refused, and exit 1."""
    if exc.code == "workspace_changed":
        for path in exc.files:
            click.echo(f"  changed: {path}", err=True)
        fail("these files changed since crushd recorded them; --force overwrites them")
    fail(exc.message)


def _print_restore(result: dict[str, Any] | None, dry_run: bool) -> None:
    result = result or {}
    written, deleted = ("would restore", "would remove") if dry_run else ("restored", "removed")
    for path in result.get("written", ()):
        click.echo(f"{written}  {path}")
    for path in result.get("deleted", ()):
        click.echo(f"{deleted}  {path}")
    for path in result.get("overridden", ()):
        click.echo(f"crushd: {path} had changed since; overwritten (--force)", err=True)
    for path in result.get("unrecorded", ()):
        click.echo(f"crushd: {path} was too large to record; it cannot be brought back", err=True)


@click.command()
@client_options
@click.argument("run_id", metavar="RUN")
@workspace_option
@click.option("--tool-call", "tool_call_id", metavar="ID", help="Only this tool call's changes.")
@click.option("--stat", is_flag=True, help="The changed files with lines added and removed.")
@api_json_option
def diff(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    run_id: str,
    workspace_arg: str | None,
    tool_call_id: str | None,
    stat: bool,
    as_json: bool,
) -> None:
    """Print what RUN changed in the workspace's files, as a unified diff."""
    with connected(url, unix_socket, token_file) as client:
        wid = find_workspace_of(client, "run", run_id, workspace_arg)
        answer = client.diff(wid, run_id, tool_call_id, stat=stat or as_json)
    if as_json:
        print_json(answer)
        return
    if not stat:
        click.echo(answer, nl=False)
        return
    rows = [
        [
            f["status"],
            "binary" if f["binary"] else f"+{f['added']} -{f['removed']}",
            f"{f['old_path']} -> {f['path']}" if f["old_path"] else f["path"],
        ]
        for f in answer["files"]
    ]
    print_table(["STATUS", "LINES", "PATH"], rows)
    for line in answer["note"].splitlines():
        click.echo(f"crushd: not recorded: {line}", err=True)


@click.command()
@client_options
@click.argument("session_id", metavar="SESSION")
@click.option("--to", "run_id", metavar="RUN", help="Revert to before this run of the session.")
@click.option("--message", "message_id", metavar="ID", help="Revert to before this message.")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("--force", is_flag=True, help="Overwrite files that changed since.")
@workspace_option
@api_json_option
def revert(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    session_id: str,
    run_id: str | None,
    message_id: str | None,
    dry_run: bool,
    force: bool,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """Undo SESSION's runs from RUN on: the files they changed go back to
    what they were before it, and their messages leave the conversation
    (kept, marked reverted); crushd unrevert undoes it."""
    from crushd.client import ApiError

    if (run_id is None) == (message_id is None):
        raise click.UsageError("give either --to RUN or --message ID")
    with connected(url, unix_socket, token_file) as client:
        wid = find_workspace_of(client, "session", session_id, workspace_arg)
        try:
            answer = client.revert(
                wid, session_id, run_id=run_id, message_id=message_id, dry_run=dry_run, force=force
            )
        except ApiError as exc:
            _refused(exc)
    if as_json:
        print_json(answer)
        return
    _print_restore(answer["restored"], dry_run)
    what = "would revert" if dry_run else "reverted"
    click.echo(
        f"crushd: {what} {len(answer['messages'])} messages and {len(answer['files'])} files",
        err=True,
    )


@click.command()
@client_options
@click.argument("session_id", metavar="SESSION")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("--force", is_flag=True, help="Overwrite files that changed since the revert.")
@workspace_option
@api_json_option
def unrevert(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    session_id: str,
    dry_run: bool,
    force: bool,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """Undo SESSION's latest revert: its files and messages come back."""
    from crushd.client import ApiError

    with connected(url, unix_socket, token_file) as client:
        wid = find_workspace_of(client, "session", session_id, workspace_arg)
        try:
            answer = client.revert(wid, session_id, "unrevert", dry_run=dry_run, force=force)
        except ApiError as exc:
            _refused(exc)
    if as_json:
        print_json(answer)
        return
    _print_restore(answer["undone"], dry_run)


@click.command()
@client_options
@click.argument("session_id", metavar="SESSION")
@click.option("--message", "message_id", metavar="ID", help="The last message to copy.")
@click.option(
    "--restore-files", is_flag=True, help="Also revert the files later tool calls changed."
)
@click.option("--force", is_flag=True, help="Overwrite files that changed since.")
@workspace_option
@api_json_option
def fork(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    session_id: str,
    message_id: str | None,
    restore_files: bool,
    force: bool,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """Copy SESSION's conversation (up to --message) into a new session;
    print the new session's id."""
    from crushd.client import ApiError

    with connected(url, unix_socket, token_file) as client:
        wid = find_workspace_of(client, "session", session_id, workspace_arg)
        try:
            answer = client.revert(
                wid,
                session_id,
                "fork",
                message_id=message_id,
                restore_files=restore_files,
                force=force,
            )
        except ApiError as exc:
            _refused(exc)
    if as_json:
        print_json(answer)
        return
    if answer["revert"] is not None:
        _print_restore(answer["revert"]["restored"], False)
    click.echo(answer["session"]["id"])


COMMANDS = (diff, revert, unrevert, fork)
