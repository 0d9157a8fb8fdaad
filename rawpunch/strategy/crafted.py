"""``crafted-handshake`` as a strategy: the punch of ``rawpunch.punch.session`` (engine, NFQUEUE, splice)."""

from __future__ import annotations

import socket

from rawpunch.punch.engine import PunchConfig, options_from_peer_info
from rawpunch.strategy.base import AttemptContext, AttemptFailed


class CraftedHandshake:
    name = "crafted-handshake"
    suits = "stable NATs (endpoint-independent mapping or port preservation), also those that RST early SYNs"

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        from rawpunch.punch import session  # noqa: PLC0415 - session imports the runner

        if ctx.peer.info.isn is None:
            raise AttemptFailed("the peer sent no ISN: is it running an older rawpunch?")
        rtt = ctx.client.core.rtt
        config = PunchConfig(
            local=ctx.local,
            peer=ctx.peer_public,
            isn=ctx.isn,
            peer_isn=ctx.peer.info.isn,
            options=ctx.options,
            peer_options=options_from_peer_info(ctx.peer.info),
            priming_ttl=ctx.priming_ttl,
            slot=ctx.slot,
            deadline=ctx.budget,
            syn_delay=min(0.05, max(0.001, (rtt or 0.2) / 4)),
            rtt=rtt,
        )
        ctx.detail.update(ports=[ctx.peer_public.port], syns=1, ttl=ctx.priming_ttl)
        try:
            with session._Capture(ctx.pcap, ctx.local.port):
                return await session.punch_and_splice(ctx, config)
        except session.WrongSecret:
            raise  # no other attempt can fix it: the cascade stops
        except session.PunchError as exc:
            raise AttemptFailed(str(exc)) from None
