"""Anthropic Messages API streaming (``POST {base}/v1/messages``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from crushd.cancel import CancelToken
from crushd.common import load_json
from crushd.providers import PROVIDERS, sse
from crushd.providers.base import (
    ProviderError,
    ReasoningDelta,
    StepFinish,
    StepRequest,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
    Usage,
)
from crushd.providers.retry import classify_stream_error

logger = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
MAX_BREAKPOINTS = 4  # the Messages API refuses more cache_control blocks
DEFAULT_BASE_URL = PROVIDERS["anthropic"].base_url or ""

_STOP_REASONS = {
    "end_turn": "end_turn",
    "stop_sequence": "end_turn",
    "max_tokens": "max_tokens",
    "tool_use": "tool_use",
}


class AnthropicProvider(sse.HTTPProvider):
    """Streams one step from the Anthropic Messages API.

    ``base_url`` is the host root (``https://api.anthropic.com``).
    """

    name = "anthropic"

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        max_tokens: int = 8192,
        **options: Any,
    ) -> None:
        super().__init__(model, base_url, api_key, max_tokens=max_tokens, **options)

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def build_body(self, request: StepRequest) -> dict[str, Any]:
        """The JSON body of the Messages request for ``request``."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": to_anthropic_messages(request.messages),
            "stream": True,
        }
        if request.system:
            body["system"] = [{"type": "text", "text": request.system}]
        if request.tools:
            body["tools"] = [_tool(spec) for spec in request.tools]
        add_cache_breakpoints(body)
        return body

    def stream(self, request: StepRequest, token: CancelToken) -> Iterator[StreamEvent]:
        headers = {
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        if self._api_key:
            headers["x-api-key"] = self._api_key
        logger.debug(
            "event=provider_request provider=anthropic model=%s url=%s", self.model, self.url
        )
        state = _StepState()
        events = sse.stream_events(
            self.clients,
            self.url,
            headers=headers,
            body=self.build_body(request),
            token=token,
            provider=self.name,
            max_event=sse.event_limit(request.max_bytes),
        )
        try:
            for event, data in events:
                yield from state.feed(event, sse.decode_json(data))
                if state.stopped:
                    break
        finally:
            events.close()
        if not state.stopped:
            if state.finish is None:
                raise ProviderError(
                    "Provider stream ended early",
                    "no message_stop before end of stream",
                    retryable=True,
                )
            logger.warning("event=provider_no_message_stop provider=anthropic")
        yield Usage(
            prompt_tokens=state.input_tokens + state.cache_write_tokens + state.cache_read_tokens,
            completion_tokens=state.output_tokens,
            cache_read_tokens=state.cache_read_tokens,
            cache_write_tokens=state.cache_write_tokens,
        )
        yield StepFinish(state.finish or "unknown")


class _StepState:
    """Accumulates the events of one step; ``feed`` yields events as they become known."""

    def __init__(self) -> None:
        self.stopped = False
        self.finish: str | None = None
        self.input_tokens = 0  # uncached input only, as the API counts it
        self.cache_write_tokens = 0
        self.cache_read_tokens = 0
        self.output_tokens = 0
        self._tool_ids: dict[int, str] = {}  # content block index -> tool_use id

    def feed(self, event: str, data: dict[str, Any]) -> Iterator[StreamEvent]:
        kind = data.get("type") or event
        if kind == "error" or event == "error":
            error = data.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError(
                "Provider returned an error",
                message or json.dumps(data),
                **classify_stream_error(error),
            )
        if kind == "message_start":
            self._usage((data.get("message") or {}).get("usage") or {})
        elif kind == "content_block_start":
            yield from self._block_start(data.get("index", 0), data.get("content_block") or {})
        elif kind == "content_block_delta":
            yield from self._block_delta(data.get("index", 0), data.get("delta") or {})
        elif kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = _STOP_REASONS.get(reason, "unknown")
            self._usage(data.get("usage") or {})
        elif kind == "message_stop":
            self.stopped = True
        # content_block_stop, ping and event types added later carry nothing we use.

    def _usage(self, usage: dict[str, Any]) -> None:
        # message_delta may restate the input counts (newer API versions);
        # output is cumulative.  Cache reads and writes are input tokens too,
        # counted apart from input_tokens by the API.
        if usage.get("input_tokens") is not None:
            self.input_tokens = int(usage.get("input_tokens") or 0)
        if usage.get("cache_creation_input_tokens") is not None:
            self.cache_write_tokens = int(usage.get("cache_creation_input_tokens") or 0)
        if usage.get("cache_read_input_tokens") is not None:
            self.cache_read_tokens = int(usage.get("cache_read_input_tokens") or 0)
        if usage.get("output_tokens") is not None:
            self.output_tokens = int(usage["output_tokens"])

    def _block_start(self, index: int, block: dict[str, Any]) -> Iterator[StreamEvent]:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            yield TextDelta(block["text"])
        elif kind == "thinking" and block.get("thinking"):
            yield ReasoningDelta(block["thinking"])
        elif kind == "tool_use":
            self._tool_ids[index] = block["id"]
            yield ToolCallStart(id=block["id"], name=block.get("name", ""))
            if block.get("input"):
                yield ToolCallDelta(id=block["id"], input_delta=json.dumps(block["input"]))

    def _block_delta(self, index: int, delta: dict[str, Any]) -> Iterator[StreamEvent]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            yield TextDelta(delta["text"])
        elif kind == "thinking_delta" and delta.get("thinking"):
            yield ReasoningDelta(delta["thinking"])
        elif kind == "input_json_delta" and delta.get("partial_json"):
            call_id = self._tool_ids.get(index)
            if call_id is None:
                raise ProviderError(
                    "Provider sent invalid data", f"input_json_delta for unknown block {index}"
                )
            yield ToolCallDelta(id=call_id, input_delta=delta["partial_json"])


def add_cache_breakpoints(body: dict[str, Any]) -> int:
    """Mark the request's stable prefix for Anthropic's prompt cache; return
    how many breakpoints were set (at most :data:`MAX_BREAKPOINTS`).

    The cache is a prefix in the order tools, system, messages.  A
    breakpoint on the last tool keeps the tool definitions cached when the
    system prompt changes (an edited AGENTS.md), one on the system prompt
    covers both, and one on the last block of each of the two newest
    messages writes the conversation so far; the next step of the turn (or
    the next prompt) then reads everything up to there from the cache and
    pays full price only for what is new.
    """
    marks: list[dict[str, Any]] = []
    if body.get("tools"):
        marks.append(body["tools"][-1])
    if isinstance(body.get("system"), list) and body["system"]:
        marks.append(body["system"][-1])
    for message in body.get("messages", [])[-2:]:
        content = message.get("content")
        if isinstance(content, list) and content:
            marks.append(content[-1])
    for block in marks[-MAX_BREAKPOINTS:]:
        block["cache_control"] = {"type": "ephemeral"}
    return min(len(marks), MAX_BREAKPOINTS)


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "input_schema": spec.parameters}


def _parse_input(text: str | None) -> dict[str, Any]:
    """A stored call's arguments as the API's ``input`` object; ``{}`` for
    anything else (the run reported such a call as invalid already)."""
    try:
        value = load_json(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def to_anthropic_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert stored messages to Messages API messages.

    Tool results travel as a user message of ``tool_result`` blocks;
    reasoning and finish parts are not sent (thinking blocks would need the
    signature the API issued, which is not stored); empty text is dropped
    because the API rejects empty text blocks; consecutive messages of one
    role are merged because the API requires the roles to alternate.
    """
    result: list[dict[str, Any]] = []
    for message in messages:
        role = "assistant" if message.get("role") == "assistant" else "user"
        blocks: list[dict[str, Any]] = []
        for part in message.get("parts") or []:
            kind = part.get("type")
            if kind == "text" and part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
            elif kind == "tool_call" and role == "assistant":
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": part["id"],
                        "name": part.get("name", ""),
                        "input": _parse_input(part.get("input")),
                    }
                )
            elif kind == "tool_result":
                blocks.append(
                    {
                        "type": "tool_result",
                        "tool_use_id": part["tool_call_id"],
                        "content": part.get("content", ""),
                        "is_error": bool(part.get("is_error")),
                    }
                )
        if not blocks:
            continue
        if result and result[-1]["role"] == role:
            result[-1]["content"].extend(blocks)
        else:
            result.append({"role": role, "content": blocks})
    return result
