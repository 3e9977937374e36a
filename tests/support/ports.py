"""Free TCP ports on the loopback interface for test servers and process groups."""

import socket
from contextlib import ExitStack


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are chosen, so the OS cannot
    hand the same port out twice (two ``free_port()`` calls in a row can get one port)."""
    with ExitStack() as sockets:
        ports = []
        for _ in range(count):
            s = sockets.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports
