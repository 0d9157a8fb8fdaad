"""The TCP NAT behaviour probe: how the NAT in front of this host treats TCP (RFC 4787 / RFC 5382 terms)."""
