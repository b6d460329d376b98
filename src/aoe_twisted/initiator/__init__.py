"""
The initiator side: a userspace AoE initiator and the ``aoe-twisted`` command.

``client`` is the initiator, ``cli`` the command line.

Built on the same codec as the target (``aoe_twisted.core.wire``); used by
``make demo``, the tests and the benchmarks to talk to a target over Ethernet.
"""
