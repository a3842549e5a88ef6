"""Every close code the sockets send is one Daphne can send (Autobahn raises on any other,
and the close, and the consumer's cleanup with it, never happens)."""

from __future__ import annotations

from synthesis.stream import elevenlabs, protocol


def test_every_close_code_of_every_dialect_is_one_daphne_can_send() -> None:
    codes = {
        name: value
        for module in (protocol, elevenlabs)
        for name, value in vars(module).items()
        if name.startswith("CLOSE_") and isinstance(value, int)
    }
    assert codes["CLOSE_SERVER_ERROR"] == 4500
    assert [name for name, code in codes.items() if not protocol.sendable_close_code(code)] == []
    assert not protocol.sendable_close_code(1011)
    assert not protocol.sendable_close_code(1008)
