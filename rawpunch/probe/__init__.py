"""The TCP NAT behaviour probe: how the NAT in front of this host treats TCP (RFC 4787 / RFC 5382 terms).

* ``result``: ``NatBehaviour``, what a probe learned (shared with the lab and ``--strategy auto``);
* ``classify``: the pure classifier, observations in, ``NatBehaviour`` out (the theory of each axis);
* ``run``: the adapter on the host behind the NAT (raw sockets, root), ``await probe(server)``;
* ``timers``: the optional, bounded mapping-lifetime tests (``--timers``);
* ``packets``: the minimal IPv4 parsing and BPF filters of the raw captures;
* ``cache``: ``load()`` / ``store()`` of the last result per network, for ``--strategy auto``.

The server's part is in ``rawpunch.proto.server`` (PROBE handling, sans-IO) and
``rawpunch.rendezvous.server`` (listeners, crafted SYNs, captures).
"""
