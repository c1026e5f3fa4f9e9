"""A free local port for a world started on one machine. Imports nothing heavy, so launchers and
freshly spawned processes can use it cheaply."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
