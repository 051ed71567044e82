"""Connection deadlines that waitress lacks: slow senders and stalled readers.

waitress closes a connection only when it has been idle for
``channel_timeout``; a client that sends its request one byte a second, or
that stops reading a response, is never idle and so is kept forever:

* **Slow senders.**  Request headers that trickle in hold a channel, and
  with ``connection_limit`` of them waitress stops accepting anyone — the
  token check is never reached, so anyone who can connect can do this.
  :class:`GuardedChannel` closes a connection whose request headers are not
  complete ``header_timeout`` seconds after its first byte.
* **Stalled readers.**  An event stream whose reader stopped reading fills
  waitress's output buffer; the stream's worker thread then blocks in its
  write until the reader reads again, holding the thread, the subscriber
  and its buffers.  A connection with output waiting that has accepted no
  byte for ``stall_timeout`` seconds is closed; the blocked write then
  raises and the stream's cleanup runs.

* **Its own errors.**  A request waitress refuses before crushd sees it (a
  body over ``--max-body``, malformed or oversized headers) gets the
  contract's JSON error shape from :class:`JsonErrorTask`, not waitress's
  plain text.

The checks run on waitress's loop thread (every ``readable()`` poll, at least
once a second).  A connection is cut with ``shutdown()``, not ``close()``,
because the loop is iterating over its channel map at that moment: the
shutdown wakes the socket and waitress closes it through its own path.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from typing import Any

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

logger = logging.getLogger(__name__)


# waitress's error statuses as the contract's codes (431, 501 and the like
# are bad requests too).
ERROR_CODES = {400: "invalid_request", 413: "too_large"}


class JsonErrorTask(ErrorTask):
    """waitress's response to a request it refused, in the JSON error shape.

    The body limit is waitress's (``max_request_body_size``, one byte over
    ``--max-body``), checked against ``Content-Length`` before the body is
    read, and as a chunked body arrives."""

    def execute(self) -> None:
        error = self.request.error
        code = ERROR_CODES.get(error.code, "internal_error" if error.code >= 500 else "")
        if error.code == 413:
            limit = self.channel.server.adj.max_request_body_size - 1
            message = f"request body is larger than {limit} bytes"
        else:
            message = f"{error.reason}: {error.body}"
        body = json.dumps({"error": {"code": code or "invalid_request", "message": message}})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body.encode())


class GuardedChannel(HTTPChannel):
    """waitress's channel with a header deadline and a stall deadline.

    The two deadlines are class attributes, set by :func:`guard_connections`
    on a subclass per server.  All state is touched only on the loop thread.
    """

    header_timeout: float = 10.0
    stall_timeout: float = 30.0
    error_task_class = JsonErrorTask

    _request_started: float = 0.0
    _waiting_since: float | None = None
    _seen_activity: float = 0.0
    _cut: bool = False

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self._request_started = time.monotonic()
        return super().received(data)

    def overdue(self, now: float) -> str | None:
        """Why this connection should be cut now, or None."""
        request = self.request
        if (
            request is not None
            and not request.headers_finished
            and now - self._request_started > self.header_timeout
        ):
            return "headers_too_slow"
        # Output waiting and no byte moved (waitress's ``last_activity``) for
        # stall_timeout, counted from when this check first saw it waiting:
        # a response written after a long quiet is not stalled yet.
        if not self.total_outbufs_len:
            self._waiting_since = None
            return None
        if self._waiting_since is None or self.last_activity != self._seen_activity:
            self._waiting_since = now
            self._seen_activity = self.last_activity
            return None
        if now - self._waiting_since > self.stall_timeout:
            return "reader_stalled"
        return None

    def _may_be_overdue(self) -> bool:
        """Whether :meth:`overdue` has anything to check: request headers
        still arriving, output waiting, or a wait it must forget.  waitress
        asks every channel on every turn of its loop, and most are idle
        keep-alive connections; for those this is all it costs."""
        request = self.request
        return bool(
            self.total_outbufs_len
            or self._waiting_since is not None
            or (request is not None and not request.headers_finished)
        )

    def readable(self) -> bool:
        if not self._cut and self._may_be_overdue():
            reason = self.overdue(time.monotonic())
            if reason is not None:
                self._cut = True
                logger.warning(
                    "event=connection_cut reason=%s peer=%s buffered=%d",
                    reason,
                    self.addr[0] if isinstance(self.addr, tuple) else self.addr,
                    self.total_outbufs_len,
                )
                self.will_close = True
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:  # already gone: waitress closes it either way
                    pass
        return super().readable()


def guard_connections(wsgi: Any, header_timeout: float, stall_timeout: float) -> None:
    """Make every listener of a waitress server use :class:`GuardedChannel`
    with these deadlines.  Call after ``create_server`` and before ``run``."""
    channel = type(
        "CrushdChannel",
        (GuardedChannel,),
        {"header_timeout": header_timeout, "stall_timeout": stall_timeout},
    )
    listeners = [wsgi]
    if not hasattr(wsgi, "channel_class"):  # a multi-socket server holds several
        listeners = [d for d in wsgi.map.values() if hasattr(d, "channel_class")]
    for listener in listeners:
        listener.channel_class = channel


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (never above the
    hard limit); returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning(
                "event=open_files_limit_unchanged soft=%d wanted=%d error=%s", soft, target, exc
            )
    return soft
