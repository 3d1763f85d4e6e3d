"""Reading a request body within its deadline, over a real socket pair."""

from __future__ import annotations

import socket
import time

import pytest

from app.bodies import BodyTimeout, read_within


def test_a_body_that_arrives_is_read_whole() -> None:
    client, server = socket.socketpair()
    with client, server, server.makefile("rb") as stream:
        client.sendall(b'{"model": "m"}')
        client.shutdown(socket.SHUT_WR)
        assert read_within(stream, server, 5) == b'{"model": "m"}'
        assert server.gettimeout() is None  # the socket is left as it was


def test_a_body_that_trickles_past_the_deadline_is_cut_off() -> None:
    client, server = socket.socketpair()
    with client, server, server.makefile("rb") as stream:
        client.sendall(b'{"model": ')  # and nothing more: the client neither sends nor leaves
        started = time.monotonic()
        with pytest.raises(BodyTimeout):
            read_within(stream, server, 0.5)
        # The deadline is looked at four times a second.
        assert 0.5 <= time.monotonic() - started < 1.5
        # The answer can still be written.
        server.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 408")
