"""OpenAI-compatible ``/chat/completions`` streaming (OpenAI, Ollama, vLLM, llama.cpp, ...)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from crushd.cancel import CancelToken
from crushd.common import text_of
from crushd.providers import sse
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

_FINISH_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}


class OpenAIProvider(sse.HTTPProvider):
    """Streams one step from an OpenAI-compatible chat completions endpoint.

    ``base_url`` includes the version path (``http://localhost:11434/v1``).
    """

    name = "openai"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def build_body(self, request: StepRequest) -> dict[str, Any]:
        """The JSON body of the chat completions request for ``request``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_chat_messages(request.system, request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [_tool(spec) for spec in request.tools]
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def stream(self, request: StepRequest, token: CancelToken) -> Iterator[StreamEvent]:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        logger.debug("event=provider_request provider=openai model=%s url=%s", self.model, self.url)
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
            for _event, data in events:
                if data.strip() == "[DONE]":
                    state.done = True
                    break
                yield from state.feed(sse.decode_json(data))
        finally:
            events.close()
        if not state.done:
            if state.finish is None:
                raise ProviderError(
                    "Provider stream ended early", "no [DONE] before end of stream", retryable=True
                )
            logger.warning("event=provider_no_done provider=openai finish=%s", state.finish)
        yield from state.flush_pending_calls()
        if state.usage is not None:
            yield state.usage
        yield StepFinish(state.finish or "unknown")


@dataclass
class _ToolCall:
    id: str
    server_id: bool  # False when the server sent none and the id was made up here
    name: str = ""
    started: bool = False
    pending_args: list[str] = field(default_factory=list)


class _StepState:
    """Accumulates the chunks of one step; ``feed`` yields events as they become known."""

    def __init__(self) -> None:
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None
        self._calls: dict[int, _ToolCall] = {}  # by the chunk's tool call index

    def feed(self, chunk: dict[str, Any]) -> Iterator[StreamEvent]:
        error = chunk.get("error")
        if error:
            raise ProviderError(
                "Provider returned an error",
                sse.error_message(json.dumps(chunk)),
                **classify_stream_error(error),
            )
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            self.usage = Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                # Part of prompt_tokens, billed at the cached rate.
                cache_read_tokens=int(details.get("cached_tokens") or 0)
                if isinstance(details, dict)
                else 0,
            )
        choices = chunk.get("choices") or []
        if not choices:
            return
        choice = choices[0]
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            yield ReasoningDelta(reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            yield TextDelta(content)
        for position, call in enumerate(delta.get("tool_calls") or []):
            yield from self._feed_call(position, call)
        reason = choice.get("finish_reason")
        if reason:
            self.finish = _FINISH_REASONS.get(reason, "unknown")

    def _feed_call(self, position: int, chunk: dict[str, Any]) -> Iterator[StreamEvent]:
        index = chunk.get("index", position)
        function = chunk.get("function") or {}
        call_id = chunk.get("id")
        call = self._calls.get(index)
        # Some servers (Ollama) reuse index 0 for every parallel call and tell
        # them apart only by a new id.
        if call is None or (call_id and call.server_id and call.started and call_id != call.id):
            call = _ToolCall(id=call_id or f"call_{uuid.uuid4().hex[:24]}", server_id=bool(call_id))
            self._calls[index] = call
        if function.get("name") and not call.started:
            call.name = function["name"]
            call.started = True
            yield ToolCallStart(id=call.id, name=call.name)
            if call.pending_args:
                yield ToolCallDelta(id=call.id, input_delta="".join(call.pending_args))
                call.pending_args.clear()
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            if call.started:
                yield ToolCallDelta(id=call.id, input_delta=arguments)
            else:
                call.pending_args.append(arguments)

    def flush_pending_calls(self) -> Iterator[StreamEvent]:
        """Calls whose name never came still reach the run loop, which reports them."""
        for call in self._calls.values():
            if not call.started:
                call.started = True
                yield ToolCallStart(id=call.id, name=call.name)
                if call.pending_args:
                    yield ToolCallDelta(id=call.id, input_delta="".join(call.pending_args))


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def to_chat_messages(system: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert stored messages to chat completion messages.

    Reasoning and finish parts are not sent; an assistant message with
    neither text nor tool calls is skipped; every ``tool_result`` part
    becomes its own ``tool`` message.
    """
    chat: list[dict[str, Any]] = []
    if system:
        chat.append({"role": "system", "content": system})
    for message in messages:
        parts = message.get("parts") or []
        text = text_of(parts)
        role = message.get("role")
        if role == "assistant":
            calls = [
                {
                    "id": p["id"],
                    "type": "function",
                    "function": {"name": p.get("name", ""), "arguments": p.get("input") or "{}"},
                }
                for p in parts
                if p.get("type") == "tool_call"
            ]
            if not text and not calls:
                continue
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = calls
            chat.append(entry)
            continue
        for part in parts:
            if part.get("type") == "tool_result":
                chat.append(
                    {
                        "role": "tool",
                        "tool_call_id": part["tool_call_id"],
                        "content": part.get("content", ""),
                    }
                )
        if role == "user" and text:
            chat.append({"role": "user", "content": text})
    return chat
