"""Model providers: the built-in ``echo`` and the HTTP ``openai`` and ``anthropic``.

:func:`create_provider` builds one from configuration values; the interface
types are re-exported from :mod:`crushd.providers.base`.
"""

from __future__ import annotations

from crushd.providers.base import (
    FINISH_REASONS,
    Provider,
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

PROVIDER_NAMES = ("echo", "openai", "anthropic")
OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"

__all__ = [
    "FINISH_REASONS",
    "PROVIDER_NAMES",
    "Provider",
    "ProviderError",
    "ReasoningDelta",
    "StepFinish",
    "StepRequest",
    "StreamEvent",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallStart",
    "ToolSpec",
    "Usage",
    "create_provider",
]


def create_provider(
    name: str,
    *,
    model: str | None,
    base_url: str | None,
    api_key: str | None,
    echo_delay: float = 0.02,
) -> Provider:
    """Build the provider called ``name``; raises ValueError for a bad configuration.

    Creates an HTTP client but opens no connection: calling it at startup
    with a wrong URL or key succeeds, the first model step reports the error.
    """
    if name == "echo":
        from crushd.providers.echo import EchoProvider

        return EchoProvider(model=model or "echo", delay=echo_delay)
    if name == "openai":
        if not model:
            raise ValueError(
                "the openai provider needs a model name (--model), "
                "e.g. --model gpt-4o-mini or --model llama3.2 for Ollama"
            )
        from crushd.providers.openai import OpenAIProvider

        return OpenAIProvider(model, base_url or OPENAI_BASE_URL, api_key)
    if name == "anthropic":
        if not model:
            # No default: a hard-coded model name goes stale with the next release.
            raise ValueError(
                "the anthropic provider needs a model name (--model), "
                "e.g. --model claude-sonnet-4-5"
            )
        from crushd.providers.anthropic import AnthropicProvider

        return AnthropicProvider(model, base_url or ANTHROPIC_BASE_URL, api_key)
    raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDER_NAMES)}")
