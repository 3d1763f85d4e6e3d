"""DashScope's upload flow through the gateway: policies per channel, files bound to accounts."""

from __future__ import annotations

import zlib
from datetime import timedelta
from typing import Any

from app.bodies import OSS_SCHEME, oss_urls
from app.channels import ChannelPool, NoUsableChannel
from app.config import Channel
from app.gateway import Gateway
from app.store import Caller, utcnow
from app.store.rates import take_call
from app.store.uploads import owned_uploads, record_upload, sticky_channel

# DashScope keeps an uploaded file 48 h, bound to the account of the key that asked for it.
UPLOAD_LIFETIME = timedelta(hours=48)
# getPolicy calls are limited per gateway key ([server] upload_policies_per_second): DashScope
# allows 100 a second per account and model, and one tenant must not use up a shared account's.
POLICY_SCOPE = "getPolicy"


class OssInputRefused(ValueError):
    """An `oss://` input names a file this account did not upload for this model."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


def allow_policy(gateway: Gateway, caller: Caller) -> bool:
    """Count a getPolicy call of the caller's key; False when its second's share is used up."""
    per_second = gateway.settings.upload_policies_per_second
    return take_call(gateway.engine, caller.key_id, POLICY_SCOPE, utcnow(), per_second)


def policy_channel(gateway: Gateway, caller: Caller, model: str) -> Channel:
    """Return the channel to ask for a policy: the account's current one for the model if usable."""
    # The SDK asks once per file, in parallel, and one submit names them all: they must all be
    # on one DashScope account, so an account keeps its channel while its uploads are valid.
    name = sticky_channel(gateway.engine, caller.account_id, model, utcnow())
    channel = gateway.pool.get(name) if name is not None else None
    if (
        channel is not None
        and model in channel.models
        and not gateway.pool.is_cooling(channel, model)
    ):
        return channel
    candidates = gateway.pool.candidates(model)
    if not candidates:
        raise NoUsableChannel(model)
    # No upload yet: parallel first calls must agree without one another's records, so the pick
    # is fixed by the account and model within the best usable tier, not drawn at random.
    top = max(channel.priority for channel in candidates)
    tier = sorted((c for c in candidates if c.priority == top), key=lambda c: c.name)
    return tier[zlib.crc32(f"{caller.account_id}/{model}".encode()) % len(tier)]


def remember_policy(
    gateway: Gateway, caller: Caller, channel: Channel, model: str, data: Any
) -> None:
    """Record the upload directory of a policy DashScope gave, for the account and channel."""
    policy = data.get("data") if isinstance(data, dict) else None
    upload_dir = policy.get("upload_dir") if isinstance(policy, dict) else None
    if not isinstance(upload_dir, str) or not upload_dir or "\x00" in upload_dir:
        return  # nothing to bind: a file uploaded under it would be refused anyway
    now = utcnow()
    record_upload(
        gateway.engine,
        upload_dir=upload_dir.strip("/"),
        account_id=caller.account_id,
        channel=channel.name,
        model=model,
        now=now,
        expires_at=now + UPLOAD_LIFETIME,
    )


def upload_channel(gateway: Gateway, caller: Caller, model: str, input_: Any) -> str | None:
    """Return the one channel holding the `oss://` files of an input, None without any."""
    found = list(oss_urls(input_))
    if not found:
        return None
    dirs = {field: url[len(OSS_SCHEME) :].rpartition("/")[0] for field, url in found}
    for field, upload_dir in dirs.items():
        if "\x00" in upload_dir:  # no upload folder has one (and PostgreSQL cannot look it up)
            raise OssInputRefused(field, "not a file this account uploaded, or it expired.")
    owned = owned_uploads(gateway.engine, caller.account_id, sorted(set(dirs.values())), utcnow())
    channels = set()
    for field, upload_dir in dirs.items():
        upload = owned.get(upload_dir)
        if upload is None:
            raise OssInputRefused(field, "not a file this account uploaded, or it expired.")
        if upload.model != model:
            raise OssInputRefused(
                field, f"the file was uploaded for another model, {upload.model}."
            )
        channels.add(upload.channel)
    if len(channels) > 1:
        field = found[-1][0]
        raise OssInputRefused(field, "the files were uploaded to different upstream accounts.")
    return channels.pop()


def only_channel(pool: ChannelPool, name: str | None) -> list[Channel] | None:
    """Return the one configured channel of that name as a candidate list, None for any."""
    if name is None:
        return None
    channel = pool.get(name)
    return [channel] if channel is not None else []
