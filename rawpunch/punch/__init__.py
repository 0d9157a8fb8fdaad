"""The punch: crafted TCP handshakes between two NATed peers, and the adapters around them."""
