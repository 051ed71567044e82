"""The built-in offline provider: replies with the prompt, one word at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator

from crushd.cancel import CancelToken
from crushd.common import text_of
from crushd.providers.base import Provider, StepFinish, StepRequest, StreamEvent, TextDelta, Usage

_WORD = re.compile(r"\s*\S+\s*|\s+")


def split_words(text: str) -> list[str]:
    """Split ``text`` into words that carry their trailing whitespace.

    Leading whitespace stays with the first word, so the pieces always join
    back to ``text`` exactly.
    """
    return _WORD.findall(text)


class EchoProvider(Provider):
    """Streams the last user prompt back verbatim, ``delay`` seconds per word."""

    name = "echo"

    def __init__(self, model: str = "echo", delay: float = 0.02) -> None:
        self.model = model
        self.delay = delay

    def stream(self, request: StepRequest, token: CancelToken) -> Iterator[StreamEvent]:
        prompt = _last_user_text(request.messages)
        words = split_words(prompt)
        for index, word in enumerate(words):
            if index and self.delay > 0:
                token.wait(self.delay)
            token.raise_if_cancelled()
            yield TextDelta(word)
        yield Usage(prompt_tokens=len(words), completion_tokens=len(words))
        yield StepFinish("end_turn")


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return text_of(message["parts"])
    return ""
