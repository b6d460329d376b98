"""aoe-twisted's built-in ``--backend`` schemes: ``memory``, ``file``, ``block`` and ``thread``."""

from aoe_twisted.backends.factories import (
    BlockDeviceBackendFactory,
    FileBackendFactory,
    MemoryBackendFactory,
    ThreadedBackendFactory,
)

memory_backend = MemoryBackendFactory()
file_backend = FileBackendFactory()
block_backend = BlockDeviceBackendFactory()
thread_backend = ThreadedBackendFactory()
