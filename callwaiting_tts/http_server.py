"""Daphne as this service runs it: bounded request bodies, and access lines without secrets.

Twisted, under Daphne, reads a request's whole body before the application sees
any of it, and parses form and multipart bodies into `request.args` on the event
loop: all before authentication, and Daphne never uses those args. A 50 MB
multipart body from anyone cost the process some 600 MB, and a 10 MB form body
stopped every stream on the process for seconds. So here:

- Twisted parses no body (`parsePOSTFormSubmission=False`). Django parses what a
  view asks for, after authentication.
- A body's size is checked against its route's limit from the request's headers,
  before any of it is read: REQUEST_BODY_MAX_BYTES on every route, and the voice
  upload's own, larger limit on the upload route for a request that presents a
  key (`Authorization: Bearer`; a wrong key can make the server hold one upload,
  on disk, until the view refuses it). A chunked body is counted as it arrives.
- A body over its limit is answered 413 in the service's JSON error shape at once.
  What the client still sends is then read and dropped, never kept, for at most
  DISCARD_SECONDS and DISCARD_BYTES, so that an ordinary client, which sends its
  whole body before it reads, gets the answer rather than a reset connection;
  then the connection is closed.

WebSockets are untouched: their handshake has no body and Daphne hands the
connection over before any of this applies.

Nobody holds a connection for long before authentication (slowloris): a request's
headers must all arrive within HTTP_HEADER_TIMEOUT_SECONDS (Twisted's own timeout
is an idle one, reset by every byte, so a byte every few seconds kept a connection
for ever); a body must come at HTTP_BODY_MIN_BYTES_PER_SECOND once
HTTP_BODY_GRACE_SECONDS have passed (each second of grace is earned again by that
many bytes, as Apache's mod_reqtimeout does); a WebSocket handshake and its auth
within WS_AUTH_SECONDS (Daphne's handshake and connect timeouts, set in serve.py,
and the consumer's auth deadline); and one client address holds at most
CONNECTIONS_PER_CLIENT_MAX connections (a wrapper around the factory, which sees
each connection end whether it stayed HTTP or became a WebSocket). Each cut is
counted in `cwt_connections_cut_total` by reason.

Requests that Twisted or Daphne refuse before the application sees them (a bad
Content-Length, broken chunked framing, an invalid header name, a request line or
path that does not parse, too many or too long headers) were answered with a bare
`400` that had no body, no Content-Type and no X-Request-ID. Here they get the
service's JSON error shape too: `400 malformed_request`, or `431 headers_too_large`
for headers over Twisted's limits, with a request id, and the connection closed
(what follows a framing error cannot be trusted to be the next request).
"""

from __future__ import annotations

import io
import json
import logging
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any

from daphne.access import AccessLogGenerator
from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.server import Server
from django.conf import settings
from django.urls import reverse
from twisted.internet import reactor as twisted_reactor
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers

from api.errors import error_body
from callwaiting_tts.logs import redact_secrets
from core.metrics import CONNECTION_CUTS
from core.request_ids import REQUEST_ID_HEADER, SANE_REQUEST_ID, new_request_id

logger = logging.getLogger(__name__)

reactor: Any = twisted_reactor  # typed by Twisted as a bare module attribute

# How long, and how much, a refused body is read on (and dropped) before the
# connection is closed: long enough for a client on a fair link to finish
# sending and read the 413; short enough that nobody holds a connection open.
DISCARD_SECONDS = 5.0
DISCARD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BodyLimit:
    max_bytes: int
    code: str
    message: str


@dataclass(frozen=True)
class BodyLimits:
    """Which limit a request's body has, from its path and headers alone."""

    default: BodyLimit
    upload_path: bytes
    upload: BodyLimit

    @classmethod
    def from_settings(cls) -> BodyLimits:
        default_max = settings.REQUEST_BODY_MAX_BYTES
        upload_cap = settings.VOICE_UPLOAD_MAX_BYTES
        return cls(
            default=BodyLimit(
                default_max, "body_too_large", f"Request bodies are limited to {default_max} bytes."
            ),
            upload_path=reverse("voice-upload").encode(),
            # The view's own code and words for an upload over the limit.
            upload=BodyLimit(
                settings.VOICE_UPLOAD_MAX_BODY_BYTES,
                "upload_too_large",
                f"The upload is over the {upload_cap} byte limit.",
            ),
        )

    def for_request(self, target: bytes, headers: Headers) -> BodyLimit:
        path = target.split(b"?", 1)[0]
        if path == self.upload_path and _presents_a_key(headers):
            return self.upload
        return self.default


def _presents_a_key(headers: Headers) -> bool:
    values = headers.getRawHeaders(b"Authorization") or []
    return any(value[:7].lower() == b"bearer " for value in values)


def _request_id_of(headers: Headers | None) -> str:
    """The client's X-Request-ID if it is sane (as the middleware decides), or a new one."""
    raw = (headers.getRawHeaders(REQUEST_ID_HEADER.encode()) or [b""])[0] if headers is not None else b""
    offered = raw.decode("latin-1")
    return offered if SANE_REQUEST_ID.match(offered) else new_request_id()


def raw_error_response(status: str, code: str, message: str, request_id: str) -> bytes:
    """A whole HTTP/1.1 error response in the error shape (api.errors), closing the connection:
    for answers written before (or instead of) the application."""
    body = error_body(None, code, message)
    body["error"]["request_id"] = request_id
    content = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + content


def _refusal(limit: BodyLimit, headers: Headers) -> tuple[bytes, str]:
    """A whole 413 response in the error shape, and its request id."""
    request_id = _request_id_of(headers)
    return raw_error_response("413 Content Too Large", limit.code, limit.message, request_id), request_id


# Daphne's own error pages (basic_error), by status: their code and words in the error shape.
_DAPHNE_ERRORS = {
    400: ("malformed_request", "The request could not be parsed: {reason}."),
    500: ("internal_error", "Something went wrong on our side; it has been logged."),
    503: ("server_timeout", "The server did not answer within its time limit; retry."),
}


class BoundedRequest(WebRequest):  # type: ignore[misc]  # daphne ships no types
    """Daphne's request, reading no more body than its route allows and parsing none of it."""

    content: IO[bytes] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._limit: BodyLimit | None = None
        self._received = 0
        self._refused = False
        self._discarded = 0
        self._closing: DelayedCall | None = None
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        # Twisted's table of reason phrases has no 422 or 429 (its status line read
        # `429 Unknown Status`); the standard library's has every registered code.
        if message is None:
            with suppress(ValueError):
                message = HTTPStatus(code).phrase.encode("ascii")
        super().setResponseCode(code, message)

    # Twisted calls gotLength once the headers are in (None: a chunked body),
    # handleContentChunk with each piece of body, and requestReceived at its end.

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed into the channel; the request learns it only at the end.
        target: bytes = getattr(self.channel, "_path", b"")
        self._limit = self.channel.factory.body_limits.for_request(target, self.requestHeaders)
        if length is not None and length > self._limit.max_bytes:
            self.content = io.BytesIO()
            # Twisted would answer `100 Continue` next, inviting the body we refuse.
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse(target)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > DISCARD_BYTES:
                self._close()
            return
        self._received += len(data)
        assert self._limit is not None  # gotLength came first
        if self._received > self._limit.max_bytes:  # only a chunked body gets here
            self._refuse(getattr(self.channel, "_path", b""))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._close()  # the body has ended, and was dropped: nothing more to read
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        super().connectionLost(reason)

    def _refuse(self, target: bytes) -> None:
        assert self._limit is not None
        self._refused = True
        response, request_id = _refusal(self._limit, self.requestHeaders)
        self.channel.transport.write(response)
        self._closing = reactor.callLater(DISCARD_SECONDS, self._close)
        path = target.split(b"?", 1)[0].decode("latin-1")
        logger.warning(
            "Refused a request body over %d bytes for %s (%s).",
            self._limit.max_bytes,
            path,
            self._limit.code,
            extra={"request_id": request_id},
        )
        self.server.log_action(
            "http",
            "complete",
            {
                "path": target.decode("latin-1"),
                "status": 413,
                "method": getattr(self.channel, "_command", b"-").decode("latin-1"),
                "client": f"{self.client.host}:{self.client.port}" if hasattr(self.client, "port") else None,
                "time_taken": 0.0,
                "size": len(response),
            },
        )

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.loseConnection()

    def basic_error(self, status: int, status_text: bytes, body: str) -> None:
        """Daphne's refusals (an invalid header name or value, a non-ASCII path or query string,
        an application that crashed or timed out) in the error shape instead of an HTML page."""
        code, message = _DAPHNE_ERRORS.get(status, ("malformed_request", "{reason}."))
        request_id = _request_id_of(self.requestHeaders)
        error = error_body(None, code, message.format(reason=body.rstrip(".").lower()))
        error["error"]["request_id"] = request_id
        self.handle_reply(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"Content-Type", b"application/json"),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                ],
            }
        )
        self.handle_reply({"type": "http.response.body", "body": json.dumps(error).encode()})


# Twisted's classes, untyped where these call them.
_HTTPChannel: Any = HTTPChannel
_WrappingFactory: Any = WrappingFactory


def connection_cut(reason: str) -> None:
    CONNECTION_CUTS.labels(reason=reason).inc()


class ServiceHTTPChannel(HTTPChannel):
    """Twisted's HTTP/1.1 connection, answering what it cannot parse in the error shape,
    and holding each request to a deadline for its headers and a minimum rate for its body."""

    _header_deadline: DelayedCall | None = None
    _body_deadline: DelayedCall | None = None
    _in_body = False
    _body_started = 0.0
    _body_received = 0

    def connectionMade(self) -> None:
        _HTTPChannel.connectionMade(self)
        self._start_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        # Between requests on a kept-alive connection no deadline runs (Twisted's idle
        # timeout does); the next request's first byte starts its header deadline.
        if self._header_deadline is None and not self._in_body and not self._handlingRequest:
            self._start_header_deadline()
        if self._in_body:
            self._body_received += len(data)
        _HTTPChannel.dataReceived(self, data)

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        if self.length != 0:  # a body follows: a length, or chunked (None)
            self._in_body = True
            self._body_started = reactor.seconds()
            self._body_received = 0
            self._body_deadline = reactor.callLater(settings.HTTP_BODY_GRACE_SECONDS, self._check_body_rate)
        _HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        self._cancel_body_deadline()
        _HTTPChannel.allContentReceived(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_deadline()
        self._cancel_body_deadline()
        _HTTPChannel.connectionLost(self, reason)

    def _start_header_deadline(self) -> None:
        self._header_deadline = reactor.callLater(
            settings.HTTP_HEADER_TIMEOUT_SECONDS, self._headers_too_slow
        )

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None

    def _cancel_body_deadline(self) -> None:
        self._in_body = False
        if self._body_deadline is not None:
            if self._body_deadline.active():
                self._body_deadline.cancel()
            self._body_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self._cut(
            "header_timeout",
            f"The request's headers did not arrive within {settings.HTTP_HEADER_TIMEOUT_SECONDS:g} s.",
        )

    def _check_body_rate(self) -> None:
        # The deadline moves on by a second for every HTTP_BODY_MIN_BYTES_PER_SECOND received.
        self._body_deadline = None
        rate = settings.HTTP_BODY_MIN_BYTES_PER_SECOND
        earned = settings.HTTP_BODY_GRACE_SECONDS + self._body_received / rate
        remaining = self._body_started + earned - reactor.seconds()
        if remaining > 0:
            self._body_deadline = reactor.callLater(remaining, self._check_body_rate)
            return
        self._in_body = False
        self._cut("body_too_slow", f"The request's body arrived slower than {rate} bytes/s.")

    def _cut(self, reason: str, message: str) -> None:
        connection_cut(reason)
        request_id = new_request_id()
        channel: Any = self
        # A body refused as too large has had its 413 already.
        answered = any(getattr(request, "_refused", False) for request in self.requests)
        if channel.transport is not None and not answered:
            channel.transport.write(
                raw_error_response("408 Request Timeout", "request_timeout", message, request_id)
            )
        logger.info("Cut a slow client (%s).", reason, extra={"request_id": request_id})
        # Twisted's own timeout: close once the answer is written, abort if the client
        # does not read it within abortTimeout.
        channel.timeoutConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's one answer for every framing error: a bad Content-Length or chunk, a
        # header line without a colon, a request line that does not parse, too many headers.
        too_many = self._receivedHeaderCount > self.maxHeaders
        self._answer_and_close(too_many or self._receivedHeaderSize > self.totalHeadersSize)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A header (or request) line over MAX_LENGTH: Twisted would just drop the connection.
        self._answer_and_close(headers_too_large=True)

    def _answer_and_close(self, headers_too_large: bool) -> None:
        request_id = new_request_id()
        if headers_too_large:
            status, code = "431 Request Header Fields Too Large", "headers_too_large"
            message = "The request's headers are too many or too long."
        else:
            status, code = "400 Bad Request", "malformed_request"
            message = "The request could not be parsed (its request line, headers or body framing)."
        # Twisted's own annotations of these two are incomplete (an untyped method, an
        # interface's method typed with `self`).
        channel: Any = self
        if channel.transport is not None:
            channel.transport.write(raw_error_response(status, code, message, request_id))
        logger.warning("Refused a malformed request (%s).", code, extra={"request_id": request_id})
        channel.loseConnection()


class BoundedHTTPFactory(HTTPFactory):  # type: ignore[misc]
    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.body_limits = BodyLimits.from_settings()

    def protocol(self) -> Any:
        # Twisted's HTTPFactory builds `_GenericHTTPChannelProtocol(HTTPChannel())`
        # (the wrapper that can switch to HTTP/2); the same around our channel.
        channel: Any = ServiceHTTPChannel
        return _GenericHTTPChannelProtocol(channel())

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedRequest
        return protocol


class PeerCountedProtocol(ProtocolWrapper):
    peer_host = ""


class PeerCappedFactory(WrappingFactory):
    """At most CONNECTIONS_PER_CLIENT_MAX connections from one address; more are closed
    as they are accepted. (Twisted's LimitConnectionsByPeer reads the address as a tuple,
    which Twisted's addresses no longer are, and counts nothing.)"""

    protocol = PeerCountedProtocol

    def __init__(self, wrapped: Any, max_per_peer: int) -> None:
        _WrappingFactory.__init__(self, wrapped)
        self.max_per_peer = max_per_peer
        self.per_peer: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", ""))
        held = self.per_peer.get(host, 0)
        if self.max_per_peer and held >= self.max_per_peer:
            connection_cut("client_connection_cap")
            return None  # Twisted closes the socket it just accepted
        protocol: Any = super().buildProtocol(addr)
        protocol.peer_host = host
        self.per_peer[host] = held + 1
        return protocol

    def unregisterProtocol(self, p: Any) -> None:
        _WrappingFactory.unregisterProtocol(self, p)
        held = self.per_peer.get(p.peer_host, 0) - 1
        if held > 0:
            self.per_peer[p.peer_host] = held
        else:
            self.per_peer.pop(p.peer_host, None)


class RedactingAccessLog(AccessLogGenerator):  # type: ignore[misc]
    """Daphne's access lines, with signed links' signatures and keys in query strings blanked."""

    def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        if isinstance(details.get("path"), str):
            details = {**details, "path": redact_secrets(details["path"])}
        super().__call__(protocol, action, details)


class ServiceServer(Server):  # type: ignore[misc]
    """Daphne's server with the bounded HTTP factory, and its listening ports kept for draining."""

    ports: list[Any]
    listen_failure: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ports = []

    # Server.run() makes its HTTP factory and listens with it in one method;
    # assigning the factory is where ours takes the place of Daphne's.
    @property
    def http_factory(self) -> PeerCappedFactory:
        return self._http_factory

    @http_factory.setter
    def http_factory(self, _daphne_factory: Any) -> None:
        self._http_factory = PeerCappedFactory(BoundedHTTPFactory(self), settings.CONNECTIONS_PER_CLIENT_MAX)

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def listen_error(self, failure: Any) -> None:
        # Daphne logs this and stops the reactor, and the process would exit 0.
        self.listen_failure = failure.getErrorMessage()
        super().listen_error(failure)
