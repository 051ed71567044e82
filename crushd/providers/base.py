"""The provider interface: one model step as a stream of events.

A provider turns a conversation (the session's stored messages, in the same
JSON shape the API returns) into one streamed model request and yields
provider-neutral events.  The run loop owns everything else: persistence,
events, tools, permissions and cleanup.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from crushd.cancel import CancelToken
from crushd.errors import ProviderError

#: Every finish part's ``reason``.  ``max_bytes`` is the run's own: the
#: message reached ``--max-message-bytes`` and the stream was cut there.
FINISH_REASONS = (
    "end_turn",
    "max_tokens",
    "max_bytes",
    "tool_use",
    "canceled",
    "error",
    "permission_denied",
    "unknown",
)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins; its arguments follow as :class:`ToolCallDelta`."""

    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of the JSON text of a tool call's arguments."""

    id: str
    input_delta: str


@dataclass(frozen=True)
class Usage:
    """Token counts of this step (not cumulative across steps).

    ``prompt_tokens`` counts every input token, cached ones included;
    ``cache_read_tokens`` and ``cache_write_tokens`` say how many of them
    were read from or written to the provider's prompt cache.
    """

    prompt_tokens: int
    completion_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class StepFinish:
    """The model ended the step; ``reason`` is one of ``end_turn``,
    ``max_tokens``, ``tool_use`` or ``unknown``."""

    reason: str


@dataclass(frozen=True)
class Retrying:
    """The attempt failed and will be retried after ``delay`` seconds.

    Yielded by :func:`crushd.providers.retry.stream_with_retries` *before*
    it waits, so the consumer can announce the retry and discard what the
    failed attempt streamed; the events that follow are the new attempt's.
    ``attempt`` is 1 for the first retry.
    """

    attempt: int
    delay: float
    error: ProviderError


StreamEvent = (
    TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | Usage | StepFinish | Retrying
)


def stopping() -> ProviderError:
    """What a model request gets once the server closed its model clients."""
    return ProviderError("Model unavailable", "the server is stopping")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True)
class StepRequest:
    """Everything a provider needs for one model step.

    ``messages`` are stored messages, oldest first, each
    ``{"role": "user"|"assistant"|"tool", "parts": [...]}`` with the part
    shapes of the API (``text``, ``reasoning``, ``tool_call``,
    ``tool_result``, ``finish``).  ``max_bytes`` is the most UTF-8 bytes
    of output the consumer keeps from the step (None: no bound); a provider
    refuses a single event far larger than that with :class:`EventTooLarge`
    instead of holding all of it in memory.
    """

    system: str
    messages: list[dict[str, Any]]
    tools: list[ToolSpec] = field(default_factory=list)
    max_bytes: int | None = None


class EventTooLarge(ProviderError):
    """One event of a stream (or one line of it) is longer than ``limit``
    characters: more than the step's output may hold, so reading it whole
    would only grow memory.  Not retried; the run ends the step as a
    message that reached its limit (finish reason ``max_bytes``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            "Message too long", f"the provider sent one event of more than {limit} characters"
        )
        self.limit = limit


# The hook of the thread consuming a stream; see waiting().
_before_wait: ContextVar[Callable[[], bool] | None] = ContextVar("before_wait", default=None)


@contextlib.contextmanager
def on_wait(hook: Callable[[], bool]) -> Iterator[None]:
    """Call ``hook`` whenever a stream read on this thread is about to wait
    for more bytes (see :func:`waiting`)."""
    reset = _before_wait.set(hook)
    try:
        yield
    finally:
        _before_wait.reset(reset)


def waiting() -> bool:
    """Called by a provider that :attr:`Provider.announces_waits`, on the
    reading thread, just before it may block for more of its stream.

    A consumer that holds events back until then (the run joins text deltas
    read together into one ``message.delta``) publishes them here, so what
    it holds never waits on the network.  Returns whether the read may be
    paced: only once the consumer has published some of the stream, so that
    pacing never delays the first text a user waits for.
    """
    hook = _before_wait.get()
    return hook() if hook is not None else False


class Provider(ABC):
    """One configured model endpoint.  Instances are shared by all runs of a
    server and must be safe to use from several threads at once."""

    name: str = ""
    model: str = ""
    # Whether stream() calls waiting() before every read that may block.
    # Only then may the consumer hold events back until that call.
    announces_waits: bool = False

    @abstractmethod
    def stream(self, request: StepRequest, token: CancelToken) -> Iterator[StreamEvent]:
        """Yield the events of one model step.

        Must raise :class:`crushd.cancel.Cancelled` within 1 s of ``token``
        being cancelled, even while blocked on a socket that never sends
        another byte (register ``token.on_cancel`` to close it).  Raises
        :class:`ProviderError` for HTTP errors, refused connections and
        streams that end early.  Ends with a :class:`StepFinish`.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections; the default has none."""
