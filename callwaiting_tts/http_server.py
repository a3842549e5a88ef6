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
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers

from api.errors import error_body
from callwaiting_tts.logs import redact_secrets
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


class ServiceHTTPChannel(HTTPChannel):
    """Twisted's HTTP/1.1 connection, answering what it cannot parse in the error shape."""

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
    def http_factory(self) -> BoundedHTTPFactory:
        return self._bounded_http_factory

    @http_factory.setter
    def http_factory(self, _daphne_factory: Any) -> None:
        self._bounded_http_factory = BoundedHTTPFactory(self)

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def listen_error(self, failure: Any) -> None:
        # Daphne logs this and stops the reactor, and the process would exit 0.
        self.listen_failure = failure.getErrorMessage()
        super().listen_error(failure)
