"""Named models: what the configuration defines, and their provider clients.

A :class:`ModelSpec` is one ``[models.NAME]`` table (or the model the
``--provider``/``--model`` flags define).  The :class:`ModelCatalog` owns
the provider client of each model, built the first time a run uses it and
shared by every workspace and run from then on, so each model keeps one
connection pool.  :meth:`ModelCatalog.close` closes them all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crushd.providers import PROVIDERS, create_provider
from crushd.providers.base import Provider, ProviderError, Usage, stopping

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_WINDOW = 128_000
PRICE_FIELDS = ("input_price", "output_price", "cache_read_price", "cache_write_price")


@dataclass(frozen=True)
class ModelSpec:
    """One configured model.  Prices are USD per million tokens."""

    name: str
    provider: str
    model: str  # the provider's id for it
    base_url: str | None = None
    api_key_env: str | None = None  # as configured; see key_env
    context_window: int = DEFAULT_CONTEXT_WINDOW
    max_output_tokens: int | None = None
    input_price: float | None = None
    output_price: float | None = None
    cache_read_price: float | None = None
    cache_write_price: float | None = None

    @property
    def key_env(self) -> str | None:
        """The variable the API key is read from (configured, else the provider's)."""
        facts = PROVIDERS.get(self.provider)
        return self.api_key_env or (facts.api_key_env if facts else None)

    @property
    def key_required(self) -> bool:
        """A key is required when one was configured or the model talks to the
        provider's own API; a local server (Ollama, vLLM) at a configured
        ``base_url`` may need none."""
        if self.key_env is None:
            return False
        return bool(self.api_key_env) or self.base_url is None

    @property
    def priced(self) -> bool:
        return self.input_price is not None or self.output_price is not None

    def cost(self, usage: Usage) -> float | None:
        """What ``usage`` cost in USD, or None for a model without prices.

        Uncached input is billed at ``input_price``, cache reads and writes
        at their own prices (``input_price`` when those are not given, an
        upper bound), output at ``output_price``; a missing input or output
        price counts as free.
        """
        if not self.priced:
            return None
        input_price = self.input_price or 0.0
        read_price = input_price if self.cache_read_price is None else self.cache_read_price
        write_price = input_price if self.cache_write_price is None else self.cache_write_price
        uncached = max(0, usage.prompt_tokens - usage.cache_read_tokens - usage.cache_write_tokens)
        total = (
            uncached * input_price
            + usage.cache_read_tokens * read_price
            + usage.cache_write_tokens * write_price
            + usage.completion_tokens * (self.output_price or 0.0)
        )
        return total / 1_000_000

    def describe(self, default: bool) -> dict[str, Any]:
        """The model as ``GET /v1/models`` lists it."""
        return {
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "context_window": self.context_window,
            "default": default,
        }


class ModelCatalog:
    """The configured models and their provider clients.  Thread-safe.

    ``providers`` pre-fills clients by model name (a test's fake provider);
    the catalog owns them as well and closes them in :meth:`close`.
    """

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        default: str,
        *,
        echo_delay: float = 0.02,
        idle_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        providers: Mapping[str, Provider] | None = None,
        factory: Callable[..., Provider] = create_provider,
    ) -> None:
        if default not in specs:
            raise ValueError(f"default model {default!r} is not among {', '.join(specs)}")
        self._specs = dict(specs)
        self.default = default
        self._echo_delay = echo_delay
        self._idle_timeout = idle_timeout
        self._env = os.environ if env is None else env
        self._factory = factory
        self._providers_lock = threading.Lock()  # guards _providers and _closed
        self._providers: dict[str, Provider] = dict(providers or {})
        self._closed = False

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def message_ids(self, name: str | None) -> tuple[str | None, str | None]:
        """What an assistant message of model ``name`` records: the
        provider's model id and the provider, or just ``name`` for a model
        that is not configured (any more)."""
        spec = self._specs.get(name) if name is not None else None
        return (spec.model, spec.provider) if spec is not None else (name, None)

    def describe(self) -> list[dict[str, Any]]:
        return [spec.describe(name == self.default) for name, spec in self._specs.items()]

    def missing_keys(self) -> list[tuple[str, str]]:
        """``(model, variable)`` for every model whose required key is unset."""
        return [
            (spec.name, spec.key_env)
            for spec in self._specs.values()
            if spec.key_required
            and spec.key_env
            and not self._env.get(spec.key_env)
            and spec.name not in self._providers
        ]

    def provider(self, name: str) -> Provider:
        """The provider client of model ``name``, built on first use.

        Raises :class:`ProviderError` for a model that is not configured (a
        run queued under an older configuration) or whose key is missing, so
        the run fails with a message that says what to fix.
        """
        with self._providers_lock:
            if self._closed:
                raise stopping()
            provider = self._providers.get(name)
            if provider is not None:
                return provider
            spec = self._specs.get(name)
            if spec is None:
                raise ProviderError(
                    "Unknown model",
                    f"model {name!r} is not configured (configured: {', '.join(self._specs)})",
                )
            key = self._env.get(spec.key_env) if spec.key_env else None
            if spec.key_required and not key:
                raise ProviderError(
                    "Missing API key",
                    f"model {name!r}: environment variable {spec.key_env} is not set",
                )
            # Building a client opens no connection: cheap enough for the lock.
            provider = self._factory(
                spec.provider,
                model=spec.model,
                base_url=spec.base_url,
                api_key=key,
                echo_delay=self._echo_delay,
                idle_timeout=self._idle_timeout,
                max_tokens=spec.max_output_tokens,
            )
            self._providers[name] = provider
        logger.info(
            "event=provider_built model=%s provider=%s id=%s", name, spec.provider, spec.model
        )
        return provider

    def close(self) -> None:
        """Close every client built so far; later :meth:`provider` calls fail.  Idempotent."""
        with self._providers_lock:
            self._closed = True
            providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            try:
                provider.close()
            except Exception:  # one client must not keep the others open
                logger.exception("event=provider_close_failed provider=%s", provider.name)
