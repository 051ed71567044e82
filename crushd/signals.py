"""blinker signals, declared on a namespace that each app owns.

Signal receivers run on worker threads; :func:`send` calls each receiver
separately and logs one that fails instead of breaking the sender (a run).
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import Namespace, Signal

logger = logging.getLogger(__name__)


class Signals:
    """The signals of one server.  ``event_published`` is sent with the
    workspace id (a string) as sender and ``event=`` the published Event."""

    def __init__(self) -> None:
        self.namespace = Namespace()
        self.event_published: Signal = self.namespace.signal("event-published")


def send(signal: Signal, sender: str, **kwargs: Any) -> None:
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:  # a receiver's bug must not break the run that sent it
            logger.exception("event=signal_receiver_failed signal=%s", signal.name)
