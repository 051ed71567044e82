"""What the ``crushd`` client commands print: one-line errors, JSON,
aligned tables and a run's live answer.

:class:`Follower` renders a run's events as they arrive: answer text on
stdout (flushed per delta, quiet once the reader closes the pipe),
reasoning and tool activity as short ``·`` lines on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from crushd.events import EventType


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"crushd: {message}", err=True)
    sys.exit(code)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Columns aligned on the widest cell; the last column is not padded."""
    cells = [headers] + [["-" if v is None or v == "" else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        click.echo("  ".join([*padded, row[-1]]).rstrip())


def short_time(stamp: str | None) -> str | None:
    """``2024-05-01T12:34:56.123456Z`` -> ``2024-05-01 12:34:56`` (UTC)."""
    return stamp[:19].replace("T", " ") if stamp else None


def one_line(text: str | None, limit: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Output:
    """Answer text on stdout, flushed per delta; a closed pipe (``| head``)
    silences it instead of killing the command before the run ends."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False
        self.wrote = False
        self.at_line_start = True

    def write(self, text: str) -> None:
        if not text or self.broken:
            return
        # State first: a Ctrl-C landing right after the flush must still see
        # the half-printed line, so that it gets its newline.
        self.wrote = True
        self.at_line_start = text.endswith("\n")
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.broken = True
            # Point fd 1 at /dev/null so the interpreter's exit flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def end_line(self) -> None:
        if self.wrote and not self.at_line_start:
            self.write("\n")


class Follower:
    """Renders one run's events: text deltas to stdout, reasoning and tool
    activity as short lines on stderr.  ``handle`` returns the terminal run
    once the run's ``run.completed`` arrives."""

    def __init__(self, workspace_id: str, run_id: str, quiet: bool) -> None:
        self.workspace_id = workspace_id
        self.run_id = run_id
        self.out = Output(sys.stdout)
        self.quiet = quiet  # --json: no answer text on stdout
        self.text: dict[str, str] = {}  # message id -> text printed
        self.last_message: str | None = None
        self.thinking = False  # a reasoning line is open on stderr
        self.tools_shown: set[str] = set()

    def progress(self, line: str, nl: bool = True) -> None:
        self._close_thinking()
        if self.out.wrote and not self.out.at_line_start and sys.stdout.isatty():
            click.echo("", err=True)  # do not glue the line to a half-printed answer
        click.echo(line, err=True, nl=nl)

    def _close_thinking(self) -> None:
        if self.thinking:
            self.thinking = False
            click.echo("", err=True)

    def handle(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        payload = event.get("payload") or {}
        if kind == EventType.RUN_COMPLETED and payload.get("id") == self.run_id:
            self._close_thinking()
            return payload
        if payload.get("run_id") != self.run_id:
            return None
        if kind == EventType.MESSAGE_DELTA:
            self._delta(payload)
        elif kind == EventType.MESSAGE_RESET:
            self._reset(payload)
        elif kind == EventType.RUN_RETRYING:
            self.progress(
                f"· provider failed ({one_line(payload.get('error'), 100)}); "
                f"retry {payload.get('attempt')} in {payload.get('delay_s')} s"
            )
        elif kind in (EventType.MESSAGE_CREATED, EventType.MESSAGE_UPDATED):
            self._message(payload)
        elif kind == EventType.PERMISSION_REQUESTED:
            what = " ".join(str(payload[k]) for k in ("tool", "action", "path") if payload.get(k))
            decide = f"/v1/workspaces/{self.workspace_id}/permissions/{payload.get('id')}"
            self.progress(
                f"· permission needed: {what}; answer with POST {decide} "
                '{"decision": "allow" | "allow_session" | "deny"}'
            )
        elif kind == EventType.PERMISSION_RESOLVED:
            self.progress(f"· permission {payload.get('decision')}: {payload.get('tool')}")
        return None

    def _delta(self, payload: dict[str, Any]) -> None:
        delta = payload.get("delta") or ""
        if payload.get("kind") == "reasoning":
            if not self.thinking:
                self.progress("· thinking: ", nl=False)
                self.thinking = True
            click.echo(delta.replace("\n", " "), err=True, nl=False)
            return
        self._close_thinking()
        message_id = payload.get("message_id") or ""
        if message_id != self.last_message and self.out.wrote:
            self.out.end_line()  # the answer of a later step starts on its own line
        self.last_message = message_id
        self.text[message_id] = self.text.get(message_id, "") + delta
        if not self.quiet:
            self.out.write(delta)

    def _reset(self, payload: dict[str, Any]) -> None:
        """A retry streams the message again; what was printed of it cannot
        be taken back, so say on stderr that it is discarded."""
        if self.text.pop(payload.get("message_id") or "", ""):
            self.out.end_line()
            self.progress("· the answer so far is discarded; the retry streams it again")

    def _message(self, message: dict[str, Any]) -> None:
        for part in message.get("parts") or []:
            if part.get("type") == "tool_call" and part.get("finished"):
                if part.get("id") not in self.tools_shown:
                    self.tools_shown.add(part.get("id"))
                    self.progress(f"· {part.get('name')} {one_line(part.get('input'), 100)}")
            elif part.get("type") == "tool_result" and message.get("role") == "tool":
                content = part.get("content") or ""
                if part.get("is_error"):
                    self.progress(f"· {part.get('name')} failed: {one_line(content, 100)}")
                else:
                    lines = content.count("\n") + (1 if content else 0)
                    self.progress(f"· {part.get('name')} done ({lines} lines)")

    def finish(self, run: dict[str, Any]) -> None:
        """Print what the stream did not show (after a fallback to polling)
        and end the answer with a newline."""
        if not self.quiet and run.get("text"):
            shown = self.text.get(run.get("message_id") or "", "")
            if run["text"].startswith(shown):
                if shown == "" and self.out.wrote:
                    self.out.end_line()
                self.out.write(run["text"][len(shown) :])
        self.out.end_line()
