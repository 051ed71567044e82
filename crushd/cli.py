"""The ``crushd`` command: ``serve`` runs the daemon; the other commands are
a client of a running daemon (see :mod:`crushd.client`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from crushd import __version__
from crushd.common import RUN_STATUSES, TERMINAL_STATUSES, new_id
from crushd.config import SERVE_OPTIONS, SINGULAR_KEYS, Config
from crushd.follow import CANCEL_WAIT, cancel_interrupted, follow_run
from crushd.terminal import Follower, fail, one_line, print_json, print_table, short_time


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crushd")
def main() -> None:
    """crushd: a headless daemon that runs AI coding-agent turns over HTTP."""


def serve_options(func: Any) -> Any:
    """The ``crushd serve`` flags, made from :data:`crushd.config.SERVE_OPTIONS`.

    A flag's type, whether it repeats and the default ``--help`` shows come
    from its :class:`~crushd.config.Config` field; every flag defaults to
    None, so one the user did not give leaves the file and ``CRUSHD_*``
    values alone.
    """
    fields = {f.name: f for f in dataclasses.fields(Config)}
    singular = {plural: one for one, plural in SINGULAR_KEYS.items()}
    for option in reversed(SERVE_OPTIONS):
        spec = fields[option.name]
        kind = str(spec.type)
        flag = "--" + (option.flag or singular.get(option.name, option.name)).replace("_", "-")
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        else:
            default = spec.default_factory()  # type: ignore[misc]
        shown = option.default_text or ("" if default in (None, []) else str(default))
        kwargs: dict[str, Any] = {"help": option.help, "metavar": option.metavar}
        if shown:
            kwargs["show_default"] = shown
        decls = [flag, option.name]
        if kind.startswith("list"):
            kwargs["multiple"] = True
        elif kind.startswith("bool"):
            decls = [f"{flag}/--no-{flag[2:]}", option.name]
            kwargs["default"] = None
        elif option.choices:
            kwargs["type"] = click.Choice(option.choices)
        elif option.path == "dir":
            kwargs["type"] = click.Path(file_okay=False, path_type=Path)
        elif option.path == "file":
            kwargs["type"] = click.Path(dir_okay=False)
        elif kind.startswith("int"):
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        func = click.option(*decls, **kwargs)(func)
    return func


@main.command()
@serve_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True),
    help="TOML configuration file (flags win over it, it wins over CRUSHD_*).",
)
def serve(config_file: str | None, **flags: object) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from crushd import logs
    from crushd.errors import ConfigError, CrushdError
    from crushd.serve import serve as run_server

    try:
        config = Config.load(flags, config_file=config_file)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    logs.configure(config.log_level)
    try:
        code = run_server(config)
    except CrushdError as exc:  # StartupError, or a request error raised while starting
        click.echo(f"crushd: {exc.message}", err=True)
        sys.exit(1)
    sys.exit(code)


# -- client commands -----------------------------------------------------------
#
# Everything below talks to a running daemon through crushd.client.  Errors
# are printed as one ``crushd: ...`` line on stderr with exit status 1;
# interrupting a command exits 130 (after cancelling the run, for `prompt`).


def client_options(func: Any) -> Any:
    """The daemon-address and token options shared by every client command."""
    func = click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        help="File holding the API token (default $CRUSHD_TOKEN, $CRUSHD_TOKEN_FILE).",
    )(func)
    func = click.option(
        "--unix-socket",
        type=click.Path(dir_okay=False),
        help="Talk to a daemon serving on this unix socket.",
    )(func)
    func = click.option(
        "--url", help="Daemon URL (default $CRUSHD_URL, else http://127.0.0.1:7433)."
    )(func)
    return func


#: The ``--workspace`` option of the commands that act on one workspace.
workspace_option = click.option(
    "--workspace", "workspace_arg", metavar="DIR", help="Directory or workspace id."
)
#: The ``--json`` option of the listing commands.
api_json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")


def read_stdin() -> str:
    """The prompt from standard input.  On a terminal, say that it is being
    read and how to end it; Ctrl-C there exits 130 like everywhere else."""
    try:
        if sys.stdin.isatty():
            click.echo(
                "crushd: reading the prompt from standard input; end it with Ctrl-D "
                "on a line of its own (Ctrl-C gives up)",
                err=True,
            )
        return sys.stdin.read()
    except KeyboardInterrupt:
        click.echo(err=True)
        fail("interrupted before the prompt was sent", 130)


@contextlib.contextmanager
def connected(url: str | None, unix_socket: str | None, token_file: str | None) -> Iterator[Any]:
    """A client for the command; its errors and Ctrl-C become exit statuses."""
    from crushd.client import Client, ClientError, resolve_token

    try:
        with Client(url, unix_socket, resolve_token(token_file)) as client:
            yield client
    except ClientError as exc:
        fail(exc.message)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def resolve_workspace(client: Any, value: str | None, register: bool = False) -> dict[str, Any]:
    """The workspace named by ``--workspace`` (a directory or a workspace id),
    default the current directory; registered first when ``register``."""
    from crushd.client import ApiError, ClientError

    if value and "/" not in value and not os.path.isdir(value):
        try:
            return client.request("GET", f"/v1/workspaces/{value}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ClientError(f"{value} is neither a directory nor a workspace id") from None
    path = os.path.abspath(value or os.getcwd())
    if register:
        return client.register(path)
    workspace = client.find_workspace(path)
    if workspace is None:
        raise ClientError(
            f"no workspace is registered for {os.path.realpath(path)} "
            f"(`crushd prompt` run there registers it)"
        )
    return workspace


@main.command()
@client_options
@click.option(
    "--workspace",
    "workspace_arg",
    metavar="DIR",
    help="Project directory or workspace id (default: the current directory).",
)
@click.option("--session", "session_id", metavar="SID", help="Continue this session.")
@click.option("--no-wait", is_flag=True, help="Print the run id once accepted and return.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON, not the answer.")
@click.argument("text", nargs=-1, required=True)
def prompt(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    workspace_arg: str | None,
    session_id: str | None,
    no_wait: bool,
    as_json: bool,
    text: tuple[str, ...],
) -> None:
    """Send TEXT to the agent and print the answer as it streams ("-" reads stdin).

    Exits 0 when the run completes, 1 when it fails or is cancelled, and 130
    after Ctrl-C (which cancels the run).
    """
    from crushd.client import ApiError

    message = read_stdin() if text == ("-",) else " ".join(text)
    if not message.strip():
        raise click.UsageError("the prompt is empty")
    # The run id is chosen here so that events can be matched before the
    # 202 arrives and a Ctrl-C at any moment knows what to cancel.
    run_id = new_id()
    with connected(url, unix_socket, token_file) as client:
        workspace = resolve_workspace(client, workspace_arg, register=True)
        wid = workspace["id"]
        if no_wait:
            run = client.submit(wid, message, session_id, run_id)
            if as_json:
                print_json(run)
            else:
                click.echo(run["id"])
            return
        # Subscribe before submitting so no delta of the run can be missed;
        # with --session the stream is filtered (and an unknown session is 404).
        try:
            stream = client.events(wid, session_id)
        except ApiError as exc:
            if exc.code != "too_many_streams":
                raise
            stream = None  # every stream slot is taken: the answer comes by polling
        follower = Follower(wid, run_id, quiet=as_json)
        try:
            client.submit(wid, message, session_id, run_id)
            run = follow_run(client, follower, stream, wid, session_id, run_id)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            follower.out.end_line()
            cancel_interrupted(client, wid, run_id)
        finally:
            if stream is not None:
                stream.close()
        follower.out.end_line()
    if as_json:
        print_json(run)
    if run["status"] != "completed":
        error = f": {run['error']}" if run.get("error") else ""
        fail(f"run {run['id']} {run['status']}{error}")
    if run.get("error"):  # completed, but e.g. a permission was denied
        click.echo(f"crushd: {run['error']}", err=True)


@main.command()
@client_options
@workspace_option
@click.option(
    "--session",
    "session_id",
    metavar="SID",
    help="The session to compact (default: the one updated last).",
)
@click.option("--model", metavar="NAME", help="A configured model to write the summary.")
@click.option("--no-wait", is_flag=True, help="Print the run id once accepted and return.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON, not the summary.")
def compact(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    workspace_arg: str | None,
    session_id: str | None,
    model: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Summarize a session so that later prompts carry the summary instead of
    its history; print the summary as it streams.

    The compaction is a run of kind ``compact``, queued behind the session's
    other runs.  Exits 0 when it completes, 1 otherwise, 130 after Ctrl-C
    (which cancels it).
    """
    from crushd.client import ApiError, ClientError

    with connected(url, unix_socket, token_file) as client:
        workspace = resolve_workspace(client, workspace_arg)
        wid = workspace["id"]
        if session_id is None:
            sessions = client.sessions(wid)
            if not sessions:
                raise ClientError(f"workspace {workspace['path']} has no sessions to compact")
            session_id = max(sessions, key=lambda s: s["updated_at"])["id"]
        try:
            stream = None if no_wait else client.events(wid, session_id)
        except ApiError as exc:
            if exc.code != "too_many_streams":
                raise
            stream = None  # every stream slot is taken: the summary comes by polling
        run = client.compact(wid, session_id, model)
        if no_wait:
            if as_json:
                print_json(run)
            else:
                click.echo(run["id"])
            return
        follower = Follower(wid, run["id"], quiet=as_json)
        try:
            run = follow_run(client, follower, stream, wid, session_id, run["id"])
        except KeyboardInterrupt:
            follower.out.end_line()
            cancel_interrupted(client, wid, run["id"])
        finally:
            if stream is not None:
                stream.close()
        follower.out.end_line()
    if as_json:
        print_json(run)
    if run["status"] != "completed":
        error = f": {run['error']}" if run.get("error") else ""
        fail(f"run {run['id']} {run['status']}{error}")


@main.command()
@client_options
@workspace_option
@click.option("--session", "session_id", metavar="SID", help="Only this session's runs.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@api_json_option
def runs(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    workspace_arg: str | None,
    session_id: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List the workspace's runs, newest first."""
    with connected(url, unix_socket, token_file) as client:
        workspace = resolve_workspace(client, workspace_arg)
        items = client.runs(workspace["id"], session_id, status, limit)
    if as_json:
        print_json(items)
        return
    print_table(
        ["RUN", "STATUS", "CREATED", "SESSION", "PROMPT"],
        [
            [
                r["id"],
                r["status"],
                short_time(r["created_at"]),
                r["session_id"][:8],
                one_line(r["prompt"], 50)
                if r.get("kind", "prompt") == "prompt"
                else f"[{r['kind']}]",
            ]
            for r in items
        ],
    )


@main.command()
@client_options
@click.argument("run_id", metavar="RUN")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the resulting run as JSON.")
def cancel(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    run_id: str,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """Cancel RUN and print its resulting status.

    The run is looked up in --workspace, else in the current directory's
    workspace, else in every registered workspace.
    """
    from crushd.client import ApiError, ClientError

    with connected(url, unix_socket, token_file) as client:
        if workspace_arg:
            candidates = [resolve_workspace(client, workspace_arg)]
        else:
            here = os.path.realpath(os.getcwd())
            candidates = sorted(client.workspaces(), key=lambda w: w["path"] != here)
        for workspace in candidates:
            try:
                client.run(workspace["id"], run_id)
            except ApiError as exc:
                if exc.status == 404:
                    continue
                raise
            break
        else:
            raise ClientError(f"run {run_id} not found")
        wid = workspace["id"]
        run = client.cancel(wid, run_id)
        if run["status"] not in TERMINAL_STATUSES:
            run = client.run(wid, run_id, wait=CANCEL_WAIT)
    if as_json:
        print_json(run)
    else:
        click.echo(run["status"])
    if run["status"] not in TERMINAL_STATUSES:
        fail(f"run {run_id} is still {run['status']} after {CANCEL_WAIT:g} s")


@main.command()
@client_options
@api_json_option
def workspaces(
    url: str | None, unix_socket: str | None, token_file: str | None, as_json: bool
) -> None:
    """List the registered workspaces."""
    with connected(url, unix_socket, token_file) as client:
        items = client.workspaces()
    if as_json:
        print_json(items)
        return
    print_table(
        ["WORKSPACE", "ACTIVE", "QUEUED", "CREATED", "PATH"],
        [
            [w["id"], w["active_runs"], w["queued_runs"], short_time(w["created_at"]), w["path"]]
            for w in items
        ],
    )


@main.command()
@client_options
@workspace_option
@api_json_option
def sessions(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """List the workspace's sessions, newest first."""
    with connected(url, unix_socket, token_file) as client:
        workspace = resolve_workspace(client, workspace_arg)
        items = client.sessions(workspace["id"])
    if as_json:
        print_json(items)
        return

    def state(s: dict[str, Any]) -> str:
        busy = "busy" if s["is_busy"] else "idle"
        return f"{busy}+{s['queued_runs']}q" if s["queued_runs"] else busy

    print_table(
        ["SESSION", "STATE", "MESSAGES", "UPDATED", "TITLE"],
        [
            [
                s["id"],
                state(s),
                s["message_count"],
                short_time(s["updated_at"]),
                one_line(s["title"], 60),
            ]
            for s in items
        ],
    )


@main.command()
@client_options
@workspace_option
@api_json_option
def mcp(
    url: str | None,
    unix_socket: str | None,
    token_file: str | None,
    workspace_arg: str | None,
    as_json: bool,
) -> None:
    """List the workspace's MCP servers: status, tools, error."""
    with connected(url, unix_socket, token_file) as client:
        workspace = resolve_workspace(client, workspace_arg)
        items = client.mcp_servers(workspace["id"])
    if as_json:
        print_json(items)
        return
    print_table(
        ["SERVER", "TRANSPORT", "STATUS", "TOOLS", "ERROR / TOOL NAMES"],
        [
            [
                s["name"],
                s["transport"],
                s["status"],
                len(s["tools"]),
                one_line(s["error"], 100) if s["error"] else one_line(" ".join(s["tools"]), 100),
            ]
            for s in items
        ],
    )


@main.command()
@click.option("--url", help="Daemon URL (default $CRUSHD_URL, else http://127.0.0.1:7433).")
@click.option(
    "--socket",
    "--unix-socket",
    "unix_socket",
    type=click.Path(dir_okay=False),
    help="Talk to a daemon serving on this unix socket.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="File holding the API token (default $CRUSHD_TOKEN, $CRUSHD_TOKEN_FILE).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="What the adapter logs to stderr.",
)
def acp(url: str | None, unix_socket: str | None, token_file: str | None, log_level: str) -> None:
    """Serve an editor over the Agent Client Protocol (JSON-RPC on stdin and
    stdout), forwarding to a running daemon.

    Editors (Zed, JetBrains, Neovim plugins) start this command themselves.
    Runs stay the daemon's: closing the editor ends this process, not them.
    """
    from crushd import logs
    from crushd.acp import serve as serve_acp
    from crushd.client import ClientError, resolve_token

    logs.configure(log_level)
    try:
        code = serve_acp(url, unix_socket, resolve_token(token_file))
    except ClientError as exc:
        fail(exc.message)
    sys.exit(code)


# The checkpoint commands live in a module of their own; they use the helpers above.
from crushd.cli_checkpoints import COMMANDS as _CHECKPOINT_COMMANDS  # noqa: E402

for _command in _CHECKPOINT_COMMANDS:
    main.add_command(_command)
