"""A TCP port for a test's process group or daemon, chosen by the OS. Ports derived from the pytest
worker's pid (29000 + (pid + offset) % 1000) collided across `make test`'s two workers, whose pids
differ by a few: two multi-process tests running at once could join each other's rendezvous."""
import socket


def free_port() -> int:
    """A port no process listens on now (bound and released: a test binds it again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
