"""What the test helper scripts here share: free loopback ports, children that die with their
parent, and whether a port accepts connections."""

import ctypes
import signal
import socket


def free_port():
    """A loopback port free right now (bound and released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def die_with_parent():
    """`preexec_fn` of a child process: SIGTERM when this process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def answers(port, timeout=0.2):
    """Whether 127.0.0.1:`port` accepts a connection."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        return True
    except OSError:
        return False
