"""aoe-twisted's built-in ``--backend`` schemes: ``memory``, ``file`` and ``block``."""

from aoe_twisted.backends.factories import (
    BlockDeviceBackendFactory,
    FileBackendFactory,
    MemoryBackendFactory,
)

memory_backend = MemoryBackendFactory()
file_backend = FileBackendFactory()
block_backend = BlockDeviceBackendFactory()
