"""Authenticate gateway keys sent the way DashScope's clients send theirs."""

from __future__ import annotations

from flask import g, request

from app.errors import invalid_api_key
from app.gateway import current_gateway
from app.store import Caller, find_caller, hash_secret


def authenticate() -> Caller:
    """Return the caller behind the request's `Authorization: Bearer` key, or fail with 401."""
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise invalid_api_key("No API-key provided.")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer":
        # DashScope also takes the bare key; so do we.
        secret = header
    secret = secret.strip()
    if not secret:
        raise invalid_api_key("No API-key provided.")
    gateway = current_gateway()
    secret_hash = hash_secret(secret)
    # A revoked key keeps working for at most [server] key_cache_seconds in each worker.
    caller = gateway.callers.get(secret_hash)
    if caller is None:
        caller = find_caller(gateway.engine, secret_hash)
        if caller is None:
            raise invalid_api_key()
        gateway.callers.put(secret_hash, caller)
    g.caller = caller
    return caller
