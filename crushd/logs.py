"""One-line key=value logging to stderr.

Messages are written as ``event=name key=value ...``; the formatter adds the
time, level and logger in front.  Values with spaces or quotes are quoted.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_JOURNAL_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def kv(value: object) -> str:
    """Render one value for a key=value log line."""
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


def _render(record: logging.LogRecord) -> str:
    """The message with its string arguments quoted as values, so a client's
    path or a directory name can neither break the line nor forge a key."""
    if isinstance(record.args, tuple) and record.args:
        args = tuple(kv(a) if isinstance(a, str | os.PathLike) else a for a in record.args)
        try:
            return str(record.msg) % args
        except (TypeError, ValueError):  # a %d given a str: fall back to the plain message
            pass
    return record.getMessage()


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = _render(record).replace("\n", "\\n")
        line = (
            f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {message}"
        )
        if record.exc_info:
            line += " exc=" + kv(self.formatException(record.exc_info))
        if self.journald:
            line = f"<{_JOURNAL_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def configure(level: str = "info") -> None:
    """Send crushd's (and waitress's) logs to stderr, one line per event.

    Under systemd (``JOURNAL_STREAM`` set) each line gets a ``<N>`` priority
    prefix that journald understands.
    """
    import os

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    for name in ("crushd", "waitress"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
