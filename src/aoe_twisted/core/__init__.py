"""
The sans-IO core: AoE frames in, decisions out.

Nothing in this package touches a socket, a reactor or a clock: the codec
(``wire``), the ATA engine (``ata``, ``identify``), the target's rules
(``acl``, ``target``), the per-interface dispatcher (``dispatch``, with its
specialised ``fastpath``) and the backend operations they ask for
(``operations``).  ``tests.test_layers`` fails if a module here imports
Twisted or ``socket``.
"""
