"""Synchronous DashScope services (face checks): forwarded, answered, never recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from app.channels import ChannelPool, call_with_failover
from app.config import Channel
from app.upstream import DashScopeClient, UpstreamAnswer


def check_with_failover(
    pool: ChannelPool,
    client: DashScopeClient,
    model: str,
    service_path: str,
    body: bytes,
    client_headers: Mapping[str, str],
    only: Sequence[Channel] | None = None,
) -> tuple[Channel, UpstreamAnswer]:
    """Call a synchronous service on the first channel that answers it for the model.

    `only` restricts the call to those channels (a check of an uploaded file goes to the
    channel the file was uploaded to).
    """
    candidates = list(only) if only is not None else pool.candidates(model)
    return call_with_failover(
        pool,
        model,
        candidates,
        lambda channel: client.call_service(channel, service_path, body, client_headers),
        # A check creates no task and bills no video: unlike a submit, any failure moves on.
        lambda _exc: True,
    )
