# -*- test-case-name: tests.test_control -*-
"""
Runtime control of a running ``twistd aoe``: a UNIX socket speaking AMP, and ``aoe-twisted ctl``.

- ``aoe_twisted.control.commands``: the AMP commands (the wire contract) and
  ``BigJSON``, the argument type that carries JSON of any size;
- ``aoe_twisted.control.server``: ``IController`` (what the server does for
  each command), ``ControlServer`` (the listening socket, with its file
  modes and peer checks) and ``ControlError``;
- ``aoe_twisted.control.ctl``: the ``aoe-twisted ctl`` command.

Nothing is imported here, so ``aoe-twisted ctl`` does not load the server.
"""
