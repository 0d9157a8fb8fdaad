"""rawpunch: raw-packet TCP NAT traversal engine and NAT lab."""

__version__ = "0.1.0"
