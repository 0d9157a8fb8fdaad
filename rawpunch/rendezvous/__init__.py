"""asyncio adapters around the sans-IO control-protocol cores (``rawpunch.proto``)."""

from rawpunch.rendezvous.client import RendezvousClient, RendezvousError
from rawpunch.rendezvous.server import RendezvousServer

__all__ = ["RendezvousClient", "RendezvousError", "RendezvousServer"]
