"""Synchronous DashScope services (face checks): forwarded, answered, never recorded."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from app.channels import AllChannelsFailed, ChannelPool, NoUsableChannel
from app.config import Channel
from app.upstream import DashScopeClient, UpstreamAnswer, UpstreamError

log = logging.getLogger(__name__)


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
    # A check creates no task and bills no video: unlike a submit, any failure may move on.
    candidates = list(only) if only is not None else pool.candidates(model)
    if not candidates:
        raise NoUsableChannel(model)
    throttled: tuple[Channel, UpstreamAnswer] | None = None
    for channel in candidates:
        try:
            answer = client.call_service(channel, service_path, body, client_headers)
        except UpstreamError:
            pool.report_failure(channel)
            log.warning("synchronous check failed", extra={"channel": channel.name})
            continue
        if answer.status in (401, 403):
            # The channel's own key (or its account) is refused: never the client's fault.
            pool.report_failure(channel, auth=True)
            log.error("upstream refused the channel's own key", extra={"channel": channel.name})
            continue
        if answer.status == 429:
            pool.report_failure(channel, throttled_model=model)
            throttled = (channel, answer)
            continue
        if answer.status >= 500:
            pool.report_failure(channel)
            continue
        pool.report_success(channel, model)
        return channel, answer
    if throttled is not None:
        return throttled  # clients should back off, as DashScope asked
    raise AllChannelsFailed(model)
