"""The ``crushd`` command: ``serve`` runs the daemon; the other commands are
a client of a running daemon (see :mod:`crushd.client`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from crushd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crushd")
def main() -> None:
    """crushd: a headless daemon that runs AI coding-agent turns over HTTP."""


@main.command()
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="TCP port (default 7433).")
@click.option(
    "--unix-socket",
    type=click.Path(dir_okay=False),
    help="Serve on this unix socket (mode 0600) instead of TCP.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory (default $CRUSHD_DATA_DIR, $STATE_DIRECTORY, $XDG_DATA_HOME/crushd).",
)
@click.option("--threads", type=int, help="waitress worker threads (default 32).")
@click.option("--workers", type=int, help="Concurrent runs per workspace (default 4).")
@click.option(
    "--provider",
    type=click.Choice(["echo", "openai", "anthropic"]),
    help="Model provider (default echo).",
)
@click.option("--model", help="Model name sent to the provider.")
@click.option("--base-url", help="Provider base URL.")
@click.option("--api-key-env", help="Environment variable that holds the API key.")
@click.option("--echo-delay", type=float, help="Seconds between echo words (default 0.02).")
@click.option(
    "--token-file", type=click.Path(dir_okay=False), help="File holding the API bearer token."
)
@click.option(
    "--allow-root",
    "allow_roots",
    multiple=True,
    help="Only allow workspaces below this directory (repeatable).",
)
@click.option("--shutdown-timeout", type=float, help="Seconds to wait for runs on close (10).")
@click.option(
    "--drain-timeout", type=float, help="Seconds running turns get to finish on a server stop (0)."
)
@click.option(
    "--permission-timeout",
    type=float,
    help="Seconds before an unanswered permission request is denied (600).",
)
@click.option("--max-body", type=int, help="Largest request body in bytes (1 MiB).")
@click.option("--max-queue", type=int, help="Queued runs allowed per session (64).")
@click.option("--max-steps", type=int, help="Model steps allowed per run (50).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True),
    help="TOML configuration file (flags win over it, it wins over CRUSHD_*).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level (default info).",
)
def serve(config_file: str | None, **flags: object) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from crushd import logs
    from crushd.config import Config, ConfigError
    from crushd.errors import CrushdError
    from crushd.serve import StartupError
    from crushd.serve import serve as run_server

    try:
        config = Config.load(flags, config_file=config_file)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    logs.configure(config.log_level)
    try:
        code = run_server(config)
    except (StartupError, CrushdError, ValueError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        click.echo(f"crushd: {message}", err=True)
        sys.exit(1)
    sys.exit(code)
