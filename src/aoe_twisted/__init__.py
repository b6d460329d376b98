"""aoe-twisted: an ATA over Ethernet (AoEr11) storage target on Twisted."""

__version__ = "0.1.0"
__all__ = ["__version__"]
