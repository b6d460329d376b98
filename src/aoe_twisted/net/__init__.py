"""
The operating system's packet sockets, as the Twisted layer uses them.

``netns`` (network namespaces), ``packetsystem`` (opening and adopting
``AF_PACKET`` sockets, an interface's MAC and MTU), ``ring`` (the
``PACKET_MMAP`` rings), ``fanout`` (``PACKET_FANOUT`` groups for
``--workers``) and ``port`` (``AoEPort``, the reactor's reader on one socket).
"""
