"""What a run tells the model besides the conversation, and how a long
conversation is made to fit (SPEC §4 "Context").

Instruction files
-----------------

A project keeps its conventions in ``AGENTS.md``, ``CLAUDE.md`` and the
like; the user keeps theirs in ``$XDG_CONFIG_HOME/crushd/AGENTS.md``.
:func:`read_instructions` reads them at the start of every run, so an edit
is seen by the next run, and turns them into one block of the system
prompt.  A file crushd cannot use (unreadable, not UTF-8, not a regular
file, a symbolic link that leaves the workspace) is skipped with a logged
warning: instructions are a help, never a reason for a run to fail.

Compaction
----------
A session outgrows its model's context window.  When the last model
request's prompt used more than :func:`compaction_threshold` tokens (as the
provider reported them), the run first asks the model for a summary
(:func:`compaction_request_messages`, no tools offered) and from then on
sends the summary (:func:`summary_message`) in place of everything before
it.  The run loop (:mod:`crushd.runs`) decides when; a :class:`Compactor`
asks for the summary and puts it in force; the store keeps the cut.
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crushd.errors import ProviderError
from crushd.events import EventType

if TYPE_CHECKING:
    from crushd.store import WorkspaceStore
    from crushd.writer import MessageWriter

logger = logging.getLogger(__name__)

#: The workspace's instruction files, in the order they are added (SPEC §4).
INSTRUCTION_FILES = (
    "AGENTS.md",
    "CRUSH.md",
    "CLAUDE.md",
    "GEMINI.md",
    ".cursorrules",
    ".github/copilot-instructions.md",
)

DEFAULT_MAX_INSTRUCTIONS_BYTES = 64 * 1024

#: The smallest reserve kept free below the window, in tokens (SPEC §4).
MIN_RESERVE = 20_000
#: Bounds on a tool call's input and a tool result in the compaction request:
#: long outputs are what fill a window, and the summary needs their gist only.
TRANSCRIPT_CALL_CHARS = 2_000
TRANSCRIPT_RESULT_CHARS = 4_000

COMPACT_INSTRUCTION = """\
Write a summary of the conversation above. It will replace the whole
conversation: after this you will see only the summary and what follows it,
so write what you need to carry on the work without the conversation.
Do not call tools and do not continue the task; answer with the summary only,
in these sections:

1. Request: what the user asked for, the latest request quoted word for word,
   and every constraint or preference they stated.
2. Done: what was done so far, in order, with the outcome of each step
   (commands run and their results, tests that passed or failed).
3. Files: every file read, created or changed, by path, with what changed in
   it or what in it matters.
4. Decisions: the choices made and why; approaches tried and abandoned.
5. Open: questions still open, errors not yet fixed, and the exact next steps.

Be specific: keep names, paths, commands, error messages and numbers exactly
as they were. Leave out pleasantries."""

SUMMARY_INTRO = """\
This conversation was compacted to fit the model's context window. The
summary below replaces everything said before this point; the messages after
it are the conversation since. Continue from where it left off.

<summary>
{summary}
</summary>"""

INSTRUCTIONS_HEADER = """\
# Instructions

The project and the user left the instructions below for the agent working
here. Follow them unless the user asks otherwise in the conversation."""


def user_instructions_path(env: Mapping[str, str] | None = None) -> Path:
    """The user's own file: ``$XDG_CONFIG_HOME/crushd/AGENTS.md`` (``~/.config`` by default)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "crushd" / "AGENTS.md"


@dataclass
class Instructions:
    """The instruction block of one run and what went into it."""

    text: str = ""  # empty when no file was found
    files: list[str] = field(default_factory=list)  # paths read, in order
    truncated: bool = False


class _Skip(Exception):
    """This file is not used; the message says why."""


def read_instructions(root: Path, user_file: Path | None, limit: int) -> Instructions:
    """Read the workspace's instruction files and the user's, in order.

    Each file goes under a heading naming its path.  Their contents together
    take at most ``limit`` bytes; what is past it is cut, and a note says
    where and what was left out.  A workspace file is read only if its real
    path stays inside the real ``root``, so a symbolic link out of the
    workspace is not followed (the user's own file may be a link anywhere).
    Never raises for a bad file; blocks only on the file system.
    """
    root = Path(os.path.realpath(root))
    candidates: list[tuple[Path, bool]] = [(root / name, True) for name in INSTRUCTION_FILES]
    if user_file is not None:
        candidates.append((Path(user_file), False))
    sections: list[str] = []
    files: list[str] = []
    budget = max(0, limit)
    cut_in: Path | None = None  # the file the limit was reached in
    left_out: list[str] = []  # files after it
    for path, confined in candidates:
        if cut_in is not None:
            if _exists(path):
                left_out.append(str(path))
            continue
        try:
            content, cut = _read(path, root if confined else None, budget)
        except FileNotFoundError:
            continue
        except _Skip as exc:
            logger.warning("event=instructions_skipped path=%s reason=%r", path, str(exc))
            continue
        if not content.strip() and not cut:
            continue
        budget -= len(content.encode())
        files.append(str(path))
        sections.append(f"## {path}\n\n{content.strip()}")
        if cut:
            cut_in = path
    if not sections:
        return Instructions()
    if cut_in is not None:
        others = f" and the files {', '.join(left_out)}" if left_out else ""
        sections[-1] += (
            f"\n\n[crushd: instructions cut here: all files together may take at most "
            f"{limit} bytes (--max-instructions-bytes); the rest of {cut_in}{others} "
            "was left out]"
        )
        logger.warning(
            "event=instructions_truncated limit=%d file=%s left_out=%s",
            limit,
            cut_in,
            ",".join(left_out) or "-",
        )
    text = "\n\n".join([INSTRUCTIONS_HEADER, *sections])
    return Instructions(text=text, files=files, truncated=cut_in is not None)


def _exists(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read(path: Path, root: Path | None, budget: int) -> tuple[str, bool]:
    """The file's text, at most ``budget`` bytes of it, and whether it was cut.

    Raises FileNotFoundError when there is no such file (not worth a
    warning) and :class:`_Skip` when there is one crushd will not use.
    """
    try:
        # Most candidates do not exist: one lstat says so, where realpath
        # takes one per component of the path.
        os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError:
        pass  # realpath says what is wrong
    try:
        real = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:  # no such file, or a dangling link: nothing to read
        raise
    except OSError as exc:  # a symlink loop, a directory it may not search
        raise _Skip(exc.strerror or str(exc)) from None
    if root is not None and real != root and not real.is_relative_to(root):
        raise _Skip(f"a symbolic link to {real}, outside the workspace")
    try:
        # O_NONBLOCK: opening a FIFO named like an instruction file must not block.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(real)) from None
        raise _Skip(exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(budget + 1)
    except OSError as exc:
        raise _Skip(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    cut = len(data) > budget
    data = data[:budget]
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # Not final when cut: a character split by the cut is dropped, not an error.
        text = decoder.decode(data, final=not cut)
    except UnicodeDecodeError as exc:
        raise _Skip(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text, cut


# -- compaction ------------------------------------------------------------


def compaction_threshold(context_window: int) -> int:
    """Prompt tokens above which the next step compacts first:
    ``context_window - reserve`` with ``reserve = max(20000, 20 % of the window)``."""
    return context_window - max(MIN_RESERVE, context_window // 5)


def summary_text(parts: list[dict[str, Any]]) -> str:
    """The text of a message's ``summary`` parts."""
    return "".join(p.get("text", "") for p in parts if p.get("type") == "summary")


def summary_message(summary: dict[str, Any]) -> dict[str, Any]:
    """The stored summary as the first (user) message of a request."""
    text = SUMMARY_INTRO.format(summary=summary_text(summary["parts"]).strip())
    return {"role": "user", "parts": [{"type": "text", "text": text}]}


def compaction_request_messages(
    summary: dict[str, Any] | None, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The messages of a compaction request, or ``[]`` when there is nothing new
    to summarize.

    The conversation is sent as plain text: the request offers no tools, and
    providers refuse tool calls and results in a request without tools
    (Anthropic does).  Tool inputs and results are clipped.  A previous
    summary comes first, so a second compaction summarizes it and what
    followed; a partial summary (a cancelled compaction) is left out.
    """
    transcript: list[dict[str, Any]] = []
    for message in messages:
        lines = []
        for part in message.get("parts") or []:
            kind = part.get("type")
            if kind == "text" and part.get("text", "").strip():
                lines.append(part["text"])
            elif kind == "tool_call":
                arguments = _clip(part.get("input") or "{}", TRANSCRIPT_CALL_CHARS)
                lines.append(f"[tool call {part.get('name', '')}: {arguments}]")
            elif kind == "tool_result":
                status = " (error)" if part.get("is_error") else ""
                content = _clip(part.get("content", ""), TRANSCRIPT_RESULT_CHARS)
                lines.append(f"[tool result {part.get('name', '')}{status}: {content}]")
        if lines:
            role = "assistant" if message.get("role") == "assistant" else "user"
            transcript.append({"role": role, "parts": [{"type": "text", "text": "\n".join(lines)}]})
    if not transcript:
        return []
    if summary is not None:
        transcript.insert(0, summary_message(summary))
    transcript.append({"role": "user", "parts": [{"type": "text", "text": COMPACT_INSTRUCTION}]})
    return transcript


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit} more characters]"


class Compactor:
    """Compacts the session of one run: asks the model for a summary and
    puts it in force.

    Takes plain values and the run's own ways to do what it does with
    everything it sends: ``stream(messages)`` streams one request without
    tools into the step's message as ``summary`` parts and returns its
    finish reason (raising Cancelled on a cancel), ``stored(write)`` calls
    a store write the way the run retries them, ``flush()`` writes the
    step's message (required) and ``publish(type, payload)`` publishes for
    the session.  Not thread-safe: the run's thread owns it.
    """

    def __init__(
        self,
        store: WorkspaceStore,
        *,
        session_id: str,
        run_id: str,
        stream: Callable[[list[dict[str, Any]]], str],
        stored: Callable[[Callable[[], Any]], Any],
        flush: Callable[[], None],
        publish: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.run_id = run_id
        self.stream = stream
        self.stored = stored
        self.flush = flush
        self.publish = publish

    def compact(self, writer: MessageWriter, keep_from: str | None, why: str) -> str | None:
        """Summarize the session so far and put the summary in force; return
        it, or None when there is nothing new to summarize.

        One request without tools; its text streams into ``writer``'s
        message (an empty assistant message of this run) as a ``summary``
        part.  Only a summary that completed moves the cut: a cancel or an
        error leaves the previous one in force.  ``keep_from`` (a message
        id) stays out of the summary and is sent after it, with everything
        later.  ``why`` is logged.  Raises ProviderError for an empty
        summary, and what streaming and the store raise.
        """
        summary, messages = self.store.context(self.session_id, before=keep_from)
        request = compaction_request_messages(
            summary, [m for m in messages if m["id"] != writer.id]
        )
        if not request:
            return None
        logger.info(
            "event=compacting run=%s session=%s why=%s messages=%d tokens=%d",
            self.run_id,
            self.session_id,
            why,
            len(messages),
            self.store.context_tokens(self.session_id),
        )
        reason = self.stream(request)
        text = writer.text("summary")
        if not text.strip():
            raise ProviderError("Compaction failed", "the model answered with an empty summary")
        if reason == "max_bytes":  # a summary cut short is still a summary, as after max_tokens
            writer.add_cut_finish()
        else:
            writer.add_finish(reason if reason in ("end_turn", "max_tokens") else "end_turn")
        self.flush()
        message_id = writer.id
        self.stored(lambda: self.store.set_summary(self.session_id, message_id, keep_from))
        self.publish(
            EventType.SESSION_COMPACTED, {"session_id": self.session_id, "message_id": message_id}
        )
        logger.info(
            "event=compacted run=%s session=%s message=%s chars=%d",
            self.run_id,
            self.session_id,
            message_id,
            len(text),
        )
        return text
