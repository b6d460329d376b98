"""The ``twistd aoe`` plugin: only a declaration, so scanning plugins imports nothing heavy."""

from twisted.application.service import ServiceMaker

aoe = ServiceMaker(
    "aoe-twisted",
    "aoe_twisted.tap",
    "Export disks as ATA over Ethernet (AoEr11) targets.",
    "aoe",
)
