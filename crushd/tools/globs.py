"""Glob patterns for ``glob`` and grep's ``include``: ``*`` and ``?`` within
one path segment, ``**`` across directories, ``[...]`` and ``{a,b}`` as in
bash, compiled to one regular expression matched against a relative
``/``-separated path.

A module of its own so that grep's matching, which runs in a child process,
can use :func:`compile_glob` without importing the tools around it.
"""

from __future__ import annotations

import re

from crushd.tools.base import ToolError

_MAX_BRACE_EXPANSIONS = 64
_MAGIC = re.compile(r"[*?\[{]")


def expand_braces(pattern: str) -> list[str]:
    """``a.{py,pyi}`` → ``["a.py", "a.pyi"]``; nested braces work, a brace
    without a top-level comma stays literal."""
    depth = 0
    start = -1
    commas: list[int] = []
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start, commas = i, []
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and commas:
                head, tail = pattern[:start], pattern[i + 1 :]
                cuts = [start, *commas, i]
                out: list[str] = []
                for a, b in zip(cuts, cuts[1:], strict=False):
                    for rest in expand_braces(pattern[a + 1 : b] + tail):
                        out.append(head + rest)
                        if len(out) >= _MAX_BRACE_EXPANSIONS:
                            return out
                return out
        elif ch == "," and depth == 1:
            commas.append(i)
    return [pattern]


def _translate_one(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        at_segment_start = i == 0 or pattern[i - 1] == "/"
        if (
            pattern.startswith("**", i)
            and at_segment_start
            and (i + 2 == n or pattern[i + 2] == "/")
        ):
            if i + 2 == n:
                out.append(".*")
                i += 2
            else:
                out.append("(?:.*/)?")
                i += 3
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(ch))
                i += 1
                continue
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a glob to a regex matched (``fullmatch``) against a relative
    ``/``-separated path: ``*`` and ``?`` stay within one segment, ``**``
    spans any number of directories, ``[...]`` and ``{a,b}`` work as in bash."""
    alternatives = [_translate_one(p) for p in expand_braces(pattern)]
    try:
        return re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL)
    except re.error as exc:
        raise ToolError(f"invalid glob pattern {pattern!r}: {exc}") from exc


def split_glob(pattern: str) -> tuple[str, str]:
    """Split off the leading directories that hold no wildcard:
    ``src/app/**/*.py`` → ``("src/app", "**/*.py")``."""
    parts = pattern.split("/")
    static: list[str] = []
    for part in parts[:-1]:
        if _MAGIC.search(part):
            break
        static.append(part)
    prefix = "/".join(static)
    if pattern.startswith("/") and not prefix:
        prefix = "/"
    rest = "/".join(parts[len(static) :])
    return prefix, rest
