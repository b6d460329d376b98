"""aoe-twisted's built-in ``--backend`` schemes: memory, file, block, thread, rbd, nbd."""

from aoe_twisted.backends.factories import (
    BlockDeviceBackendFactory,
    FileBackendFactory,
    MemoryBackendFactory,
    NBDPluginFactory,
    RBDBackendFactory,
    ThreadedBackendFactory,
)

memory_backend = MemoryBackendFactory()
file_backend = FileBackendFactory()
block_backend = BlockDeviceBackendFactory()
thread_backend = ThreadedBackendFactory()
rbd_backend = RBDBackendFactory()
nbd_backend = NBDPluginFactory()
