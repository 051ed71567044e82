"""Retrying failed model requests, once for every provider.

Real providers fail transiently every day: 429 rate limits, 529 overloads,
a 503 from a proxy, a connection dropped mid-stream, a stream that goes
silent.  The HTTP providers classify each failure as a :class:`ProviderError`
(``retryable``, ``retry_after``); :func:`stream_with_retries` replays the
step's request until it succeeds, the retries run out, or the token is
cancelled.

What is retried (SPEC §4 "Provider resilience"): connection errors and
timeouts before or during the stream, HTTP 408, 409, 429, 500, 502, 503,
504 and 529, and in-stream ``overloaded`` / ``rate_limit`` / ``server``
errors.  Never: 400, 401, 403, 404 and any prompt that is too long.

The wait is the provider's ``retry-after-ms`` or ``Retry-After`` (seconds or
an HTTP date) when it sends one, else exponential backoff with jitter.  A
demanded wait over :attr:`RetryPolicy.max_wait` is not waited at all: the
step fails at once with the provider's message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from crushd.cancel import Cancelled, CancelToken
from crushd.providers.base import Provider, ProviderError, Retrying, StepRequest, StreamEvent

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

# Words in an in-stream error's type or code that mean "try again later":
# Anthropic overloaded_error / rate_limit_error / api_error / timeout_error,
# OpenAI server_error / rate_limit_exceeded, OpenRouter's textual codes.
_RETRYABLE_WORDS = ("overloaded", "rate_limit", "server_error", "api_error", "timeout", "internal")

# How providers say the prompt does not fit the model (OpenAI
# context_length_exceeded, Anthropic "prompt is too long", vLLM, Ollama, ...).
_CONTEXT_WORDS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "context size",
    "maximum context",
    "prompt is too long",
    "input is too long",
    "too many tokens",
    "exceeds the context",
)


def is_context_too_long(*texts: Any) -> bool:
    """Whether an error's message, type or code says the prompt is too long."""
    joined = " ".join(str(t) for t in texts if t).lower()
    return any(word in joined for word in _CONTEXT_WORDS)


def parse_retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """The wait in seconds a response demands, or None when it demands none.

    ``retry-after-ms`` (OpenAI, Anthropic) wins over ``Retry-After``, which is
    either delay-seconds or an HTTP date (RFC 9110 §10.2.3).  A date in the
    past is a wait of 0; an unparsable value is ignored.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            millis = float(raw_ms)
        except ValueError:
            millis = -1.0
        if 0 <= millis < float("inf"):
            return millis / 1000.0
    raw = lower.get("retry-after")
    if raw is None or not raw.strip():
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0.0, when.timestamp() - now())


def classify_stream_error(error: Any) -> dict[str, Any]:
    """``ProviderError`` keyword arguments for an error sent inside a 200 stream.

    ``error`` is the ``error`` object of the event (Anthropic ``{"type",
    "message"}``, OpenAI ``{"message", "type", "code"}``; OpenRouter puts
    the HTTP status in ``code``).
    """
    if not isinstance(error, dict):
        return {
            "retryable": False,
            "context_too_long": is_context_too_long(error),
        }
    kind, code, message = error.get("type"), error.get("code"), error.get("message")
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    words = f"{kind or ''} {code or ''}".lower()
    retryable = status in RETRYABLE_STATUSES or any(w in words for w in _RETRYABLE_WORDS)
    return {
        "retryable": retryable,
        "status": status,
        "context_too_long": is_context_too_long(message, kind, code),
    }


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.  ``random`` is injectable so tests
    can pin the jitter; ``base_delay`` so they need not wait for real."""

    max_retries: int = 4
    max_wait: float = 60.0  # seconds; a longer demanded wait fails at once
    base_delay: float = 1.0  # the first backoff; it doubles per retry
    max_delay: float = 30.0  # the backoff's cap
    random: Callable[[], float] = field(default=random.random, compare=False)

    def backoff(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1-based) when the
        provider demanded none: doubling from ``base_delay``, ±25 % jitter,
        never over ``max_delay`` or ``max_wait``."""
        delay = self.base_delay * 2 ** (attempt - 1) * (0.75 + 0.5 * self.random())
        return max(0.0, min(delay, self.max_delay, self.max_wait))


NO_RETRIES = RetryPolicy(max_retries=0)


def stream_with_retries(
    provider: Provider, request: StepRequest, token: CancelToken, policy: RetryPolicy
) -> Iterator[StreamEvent]:
    """Yield the events of one model step, retrying failed attempts.

    Before each wait it yields :class:`Retrying`; everything yielded after
    that belongs to the new attempt, so the consumer must discard what the
    failed one streamed.  The wait is ``token.wait``: a cancel ends it at
    once with :class:`Cancelled`.  Raises the last :class:`ProviderError`
    when it is not retryable, the retries are used up, or the provider
    demanded a wait longer than ``policy.max_wait``.
    """
    attempt = 0
    while True:
        try:
            yield from provider.stream(request, token)
            return
        except ProviderError as exc:
            if not exc.retryable:
                raise
            if attempt >= policy.max_retries:
                if attempt:
                    retries = "1 retry" if attempt == 1 else f"{attempt} retries"
                    raise _with_note(exc, f"gave up after {retries}") from exc
                raise
            if exc.retry_after is not None and exc.retry_after > policy.max_wait:
                note = (
                    f"the provider asked to wait {exc.retry_after:g} s, "
                    f"longer than --max-retry-wait={policy.max_wait:g}"
                )
                raise _with_note(exc, note) from exc
            attempt += 1
            delay = exc.retry_after if exc.retry_after is not None else policy.backoff(attempt)
            logger.info(
                "event=provider_retry provider=%s attempt=%d delay_s=%.3f status=%s error=%r",
                provider.name,
                attempt,
                delay,
                exc.status,
                str(exc)[:200],
            )
            yield Retrying(attempt, delay, exc)
            if token.wait(delay):
                raise Cancelled(token.reason or "cancelled") from None


def _with_note(exc: ProviderError, note: str) -> ProviderError:
    details = f"{exc.details} ({note})" if exc.details else note
    return ProviderError(exc.title, details, status=exc.status, retryable=False)
