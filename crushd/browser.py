"""Browser safety: no web page may drive crushd.

crushd runs commands in its workspaces, and browsers send some requests to
any address without asking the server first: a ``text/plain`` POST from
``fetch(..., {mode: "no-cors"})``, a ``<form enctype="text/plain">``, a
beacon.  crushd reads every body as JSON (so ``curl -d`` works), so each of
those could register a workspace or submit a prompt.  A DNS-rebinding page
gets the same reach through a name of its own that resolves to 127.0.0.1.

:class:`BrowserGuard` decides, from the headers alone and before any view
runs or any body is read, whether a request may go on:

* an ``Origin`` must be crushd's own (the scheme, host and port the request
  was sent to, once that host passed the Host check) or listed with
  ``--allow-origin``;
* ``Sec-Fetch-Site: cross-site|same-site`` without such an Origin is refused
  (a browser that sends no Origin still says where the request came from);
* ``Host`` must be a loopback name, an address crushd listens on, or an
  ``--allow-host`` name — except over a unix socket, which no web page can
  reach.

Clients that send none of these headers (curl, the CLI, SDKs) pass.  Only
the ``--allow-origin`` origins get CORS headers; crushd never answers ``*``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
CORS_EXPOSE = "Retry-After, WWW-Authenticate, Content-Length"
CORS_MAX_AGE = "600"
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: ``reason`` for the log, ``message`` for the client."""

    reason: str
    message: str


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` (or ``[v6]:port``) as a lower-case name and a port;
    None when it cannot be a Host header at all."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@?# \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        name, sep, port_text = value.partition(":")
        if ":" in port_text:  # a bare IPv6 address is not a valid Host
            return None
        if not sep:
            port_text = ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        return name, int(port_text)
    return name, None


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` with the default port dropped, lower case;
    None for ``null`` and anything that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class BrowserGuard:
    """The Origin / Sec-Fetch-Site / Host checks and the CORS answers.

    Immutable after construction except :meth:`add_listen_hosts`, which the
    server calls once it knows the addresses it listens on (before serving).
    Thread-safe for reads.
    """

    def __init__(
        self,
        allow_origins: Iterable[str] = (),
        allow_hosts: Iterable[str] = (),
        listen_hosts: Iterable[str] = (),
    ) -> None:
        self.allow_origins: frozenset[str] = frozenset(
            o for o in (normalize_origin(raw) for raw in allow_origins) if o is not None
        )
        self.allow_hosts: frozenset[str] = frozenset(self._names(allow_hosts))
        self._listen_hosts: frozenset[str] = frozenset()
        self.add_listen_hosts(listen_hosts)

    @staticmethod
    def _names(values: Iterable[str]) -> Iterable[str]:
        for raw in values:
            parsed = split_host(raw)
            if parsed is not None:
                yield parsed[0]

    def add_listen_hosts(self, hosts: Iterable[str]) -> None:
        """Accept ``Host`` headers naming these listening addresses (a
        wildcard address such as ``0.0.0.0`` names no host and is skipped)."""
        names = {n for n in self._names(hosts) if n not in WILDCARD_HOSTS}
        self._listen_hosts = self._listen_hosts | names

    # -- checks ----------------------------------------------------------------

    def host_allowed(self, name: str) -> bool:
        return is_loopback_name(name) or name in self._listen_hosts or name in self.allow_hosts

    def check(
        self, headers: Mapping[str, str], scheme: str, unix_socket: bool = False
    ) -> Refusal | None:
        """None when the request may go on, else why not.  Reads headers only."""
        host_header = headers.get("Host", "").strip()
        # No Host at all (an HTTP/1.0 probe) is not a browser: browsers always send it.
        if host_header and not unix_socket:
            parsed = split_host(host_header)
            if parsed is None or not self.host_allowed(parsed[0]):
                return Refusal(
                    "host",
                    f"Host {host_header!r} is not this server's: only loopback names, the "
                    "listening address and --allow-host names are accepted "
                    "(this blocks DNS rebinding)",
                )
        origin = headers.get("Origin")
        if origin is not None:
            if not self.origin_allowed(origin, host_header, scheme, unix_socket):
                return Refusal(
                    "origin",
                    f"requests from the web origin {origin!r} are not allowed; "
                    "start crushd with --allow-origin ORIGIN to let a web page use the API",
                )
            return None
        site = headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            return Refusal(
                "sec-fetch-site",
                f"a {site} browser request without an allowed Origin is not allowed",
            )
        return None

    def origin_allowed(
        self, origin: str, host_header: str, scheme: str, unix_socket: bool = False
    ) -> bool:
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if normalized in self.allow_origins:
            return True
        if unix_socket:  # no page is served over the socket, so nothing is "own" there
            return False
        own = normalize_origin(f"{scheme}://{host_header.strip()}")
        return own is not None and own == normalized

    # -- CORS ------------------------------------------------------------------

    def cors_origin(self, headers: Mapping[str, str]) -> str | None:
        """The ``--allow-origin`` origin this request comes from, if any."""
        origin = headers.get("Origin")
        if origin is None:
            return None
        normalized = normalize_origin(origin)
        return origin.strip() if normalized in self.allow_origins else None

    @staticmethod
    def cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers.update(
                {
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": CORS_MAX_AGE,
                }
            )
        else:
            headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        return headers


def over_unix_socket(environ: Mapping[str, object]) -> bool:
    """Whether the WSGI server received this request on a unix socket.

    A TCP server always reports its numeric port in ``SERVER_PORT``;
    waitress puts the socket path there for a unix socket and gunicorn
    leaves it empty.
    """
    return not str(environ.get("SERVER_PORT", "")).isdigit()
