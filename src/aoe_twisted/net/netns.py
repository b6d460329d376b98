# -*- test-case-name: tests.test_port,tests.test_ring -*-
"""
Network namespaces: create a socket inside the namespace ``ip netns`` made.

A socket keeps the network namespace it was created in for its whole life,
so to serve an interface of another namespace it is enough to create the
socket there and come back: ``network_namespace`` moves the calling thread
into the namespace for the duration of a ``with`` block and back out of it.
The packet system (``aoe_twisted.net.packetsystem``) opens its sockets this
way, for ``--netns`` and for the tests' veth pairs between namespaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NETNS_RUN_DIR", "network_namespace"]

#: Where ``ip netns add NAME`` mounts its namespaces.
NETNS_RUN_DIR = "/var/run/netns"
#: ``setns`` flag for a network namespace (``linux/sched.h``).
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    native = getattr(os, "setns", None)  # Python 3.12+
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def network_namespace(name: str | None) -> Iterator[None]:
    """
    Run the body with the calling thread in the named network namespace.

    ``name`` is a namespace made by ``ip netns add`` (a file in
    ``NETNS_RUN_DIR``); ``None`` leaves the thread where it is.  Only this
    thread moves, and it moves back afterwards: a socket keeps the namespace it
    was created in, which is what lets one process serve in one namespace and
    talk to itself from another.  Errors entering the namespace are
    ``OSError`` whose ``filename`` is the namespace's path (``ENOENT`` for a
    name that is not a plain file name, or no such namespace; ``EPERM`` without
    ``CAP_SYS_ADMIN``).  An error moving back out is raised as it is: the
    thread would otherwise create every later socket in the wrong namespace.
    """
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    if "/" in name or name in ("", ".", ".."):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        try:
            _setns(target)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        finally:
            os.close(target)
        try:
            yield
        finally:
            # Failing to return would leave the reactor thread in the wrong
            # namespace for every later socket: let that error propagate.
            _setns(own)
    finally:
        os.close(own)
