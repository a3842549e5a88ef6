"""The Twisted and Daphne internals synthesis/stream/flow.py relies on (named there, once):
if an upgrade changes one, this fails before a slow reader can grow the server's memory."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from daphne.http_protocol import WebRequest
from daphne.server import Server
from twisted.web.http import HTTPChannel, Request

from synthesis.stream.flow import daphne_protocol, http_transport_paused


def test_daphne_hands_each_connection_a_partial_of_handle_reply_on_its_protocol() -> None:
    source = inspect.getsource(Server.create_application)
    assert "partial(self.handle_reply, protocol)" in source
    protocol = object()
    assert daphne_protocol(partial(Server.handle_reply, protocol)) is protocol
    assert daphne_protocol(print) is None


def test_twisted_requests_take_a_push_producer_that_the_channel_pauses_and_resumes() -> None:
    assert issubclass(WebRequest, Request)
    assert "self.channel.registerProducer(producer, streaming)" in inspect.getsource(Request.registerProducer)
    pause = inspect.getsource(HTTPChannel.pauseProducing)
    assert "self._waitingForTransport = True" in pause
    assert "self._requestProducer.pauseProducing()" in pause
    assert "self._requestProducer.resumeProducing()" in inspect.getsource(HTTPChannel.resumeProducing)


def test_a_channel_already_waiting_for_its_transport_reads_as_paused() -> None:
    channel: Any = HTTPChannel.__new__(HTTPChannel)
    request = Request.__new__(Request)  # no connection: only its channel is read
    request.channel = channel
    assert not http_transport_paused(request)
    channel._waitingForTransport = True
    assert http_transport_paused(request)
    assert not http_transport_paused(object())
