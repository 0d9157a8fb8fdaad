"""Error types of the control protocol, split by who is at fault (as in h11).

``RemoteProtocolError`` and its subclasses: the bytes that came in are not acceptable; the
receiver drops them and carries on. ``LocalProtocolError``: our own caller misused the core.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every rawpunch control-protocol error."""


class LocalProtocolError(ProtocolError):
    """The local caller asked for something the protocol state does not allow."""


class RemoteProtocolError(ProtocolError):
    """A received message was rejected."""


class MalformedMessage(RemoteProtocolError):
    """Truncated, oversized, or not a rawpunch message at all."""


class UnsupportedVersion(MalformedMessage):
    """A rawpunch message of a protocol version this implementation does not speak."""


class AuthenticationError(RemoteProtocolError):
    """The HMAC did not verify: forged, corrupted, or a different session's key."""


class ReplayError(RemoteProtocolError):
    """A transaction id seen before, or a reply to no outstanding request."""


class StaleCookie(RemoteProtocolError):
    """The address-validation cookie is missing, expired, or for another address."""


class UnexpectedMessage(RemoteProtocolError):
    """A valid message that the current state has no use for."""
