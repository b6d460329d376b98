"""
The disks the target serves: ``IBlockBackend`` implementations.

``memory`` keeps the disk in a ``bytearray``, ``file`` serves a regular image
file and ``block`` a block device.  ``factories`` holds the ``IBackendFactory``
plugins that open them from a ``--backend SCHEME:SPEC`` string; the plugin
module ``twisted/plugins/aoe_twisted_backends.py`` only instantiates them.
``identity`` names the disks behind the file and block backends
(``IDiskIdentity``), and has the helpers other backends name theirs with.
"""
