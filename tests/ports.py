"""A free TCP port for a multi-process launch's rendezvous: with pytest-xdist two test files may launch at the
same time, and accelerate's default port (29500) would then be taken by the other launch."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the system has just handed out and released. Another process could take it before the launch
    binds it; that race is rare, where a fixed port collides whenever two launches overlap."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
