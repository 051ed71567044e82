"""Model providers: the built-in ``echo`` and the HTTP ``openai`` and ``anthropic``.

:data:`PROVIDERS` is the one table of what crushd knows about each provider
(its name, the variable that holds its key, its default endpoint); the
configuration, the command line and :func:`create_provider` all read it.
The interface types are re-exported from :mod:`crushd.providers.base`.
"""

from __future__ import annotations

from dataclasses import dataclass

from crushd.providers.base import (
    FINISH_REASONS,
    Provider,
    ProviderError,
    ReasoningDelta,
    Retrying,
    StepFinish,
    StepRequest,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolSpec,
    Usage,
)


@dataclass(frozen=True)
class ProviderFacts:
    """What crushd knows about a provider before it builds one."""

    name: str
    #: The environment variable read for the API key unless ``--api-key-env``
    #: names another; None for a provider that needs no key.
    api_key_env: str | None = None
    #: The endpoint used unless ``--base-url`` is given.
    base_url: str | None = None
    #: Shown when ``--model`` is missing; None when the provider has a default
    #: model.  (No hard-coded default for HTTP providers: it goes stale with
    #: the next release.)
    model_example: str | None = None


PROVIDERS: dict[str, ProviderFacts] = {
    "echo": ProviderFacts("echo"),
    "openai": ProviderFacts(
        "openai",
        api_key_env="OPENAI_API_KEY",
        base_url="https://api.openai.com/v1",  # includes the version path
        model_example="--model gpt-4o-mini or --model llama3.2 for Ollama",
    ),
    "anthropic": ProviderFacts(
        "anthropic",
        api_key_env="ANTHROPIC_API_KEY",
        base_url="https://api.anthropic.com",  # the host root
        model_example="--model claude-sonnet-4-5",
    ),
}

__all__ = [
    "FINISH_REASONS",
    "PROVIDERS",
    "ProviderFacts",
    "Provider",
    "ProviderError",
    "ReasoningDelta",
    "Retrying",
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
    idle_timeout: float = 120.0,
    max_tokens: int | None = None,
) -> Provider:
    """Build the provider called ``name``; raises ValueError for a bad configuration.

    Creates an HTTP client but opens no connection: calling it at startup
    with a wrong URL or key succeeds, the first model step reports the error.
    ``idle_timeout`` bounds how long an HTTP stream may send nothing;
    ``max_tokens`` the output of one step (the provider's default if None).
    """
    facts = PROVIDERS.get(name)
    if facts is None:
        raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    if name == "echo":
        from crushd.providers.echo import EchoProvider

        return EchoProvider(model=model or "echo", delay=echo_delay)
    if not model:
        raise ValueError(
            f"the {name} provider needs a model name (--model), e.g. {facts.model_example}"
        )
    url = base_url or facts.base_url or ""
    if name == "openai":
        from crushd.providers.openai import OpenAIProvider

        return OpenAIProvider(model, url, api_key, idle_timeout=idle_timeout, max_tokens=max_tokens)
    from crushd.providers.anthropic import AnthropicProvider

    limit = {"max_tokens": max_tokens} if max_tokens is not None else {}
    return AnthropicProvider(model, url, api_key, idle_timeout=idle_timeout, **limit)
