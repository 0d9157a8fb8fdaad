"""The NAT lab: topologies as data, NAT profiles, and a builder in Linux network namespaces.

``topology`` and ``profiles`` are pure data (no root needed); ``netns.Lab`` builds a topology (root);
``clean.clean_labs`` removes what dead runs left behind. The builder modules import pyroute2, so they are not
imported here: ``from rawpunch.lab.netns import Lab``.
"""

from rawpunch.lab.profiles import PROFILES, NatProfile
from rawpunch.lab.topology import Link, Node, Route, Topology, two_nats

__all__ = ["PROFILES", "Link", "NatProfile", "Node", "Route", "Topology", "two_nats"]
