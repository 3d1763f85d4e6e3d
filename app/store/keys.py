"""Accounts and their API keys; secrets are stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.store.engine import writing
from app.store.tables import accounts, api_keys
from app.store.time import utcnow

KEY_PREFIX = "sk-"


@dataclass(frozen=True)
class Caller:
    """The account and key behind an authenticated request."""

    key_id: int
    account_id: int
    account_name: str
    models: frozenset[str] | None

    def may_use(self, model: str) -> bool:
        """Return whether this key's allowlist admits the model."""
        return self.models is None or model in self.models


@dataclass(frozen=True)
class KeyInfo:
    """What `keys list` shows about a key: never the secret."""

    key_id: int
    account_name: str
    hint: str
    models: frozenset[str] | None
    created_at: datetime
    revoked_at: datetime | None


def hash_secret(secret: str) -> str:
    """Return the stored form of a key secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse_models(value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset(filter(None, value.split(",")))


def _get_or_create_account(engine: Engine, name: str) -> int:
    with writing(engine) as conn:
        found = conn.execute(select(accounts.c.id).where(accounts.c.name == name)).scalar()
        if found is not None:
            return int(found)
    try:
        with writing(engine) as conn:
            created = conn.execute(
                insert(accounts).values(name=name, created_at=utcnow()).returning(accounts.c.id)
            ).scalar_one()
            return int(created)
    except IntegrityError:
        # Another process created the same account between our read and our insert.
        with writing(engine) as conn:
            return int(
                conn.execute(select(accounts.c.id).where(accounts.c.name == name)).scalar_one()
            )


def create_key(engine: Engine, account_name: str, models: list[str] | None = None) -> str:
    """Create a key for the account (creating the account if needed) and return its secret."""
    account_id = _get_or_create_account(engine, account_name)
    secret = KEY_PREFIX + secrets.token_hex(24)
    with writing(engine) as conn:
        conn.execute(
            insert(api_keys).values(
                account_id=account_id,
                secret_hash=hash_secret(secret),
                hint=secret[-4:],
                models=",".join(sorted(set(models))) if models else None,
                created_at=utcnow(),
            )
        )
    return secret


# Built once: constructing a statement costs more than running it against a warm cache.
_SELECT_CALLER = (
    select(api_keys.c.id, api_keys.c.account_id, api_keys.c.models, accounts.c.name)
    .join(accounts, accounts.c.id == api_keys.c.account_id)
    .where(api_keys.c.secret_hash == bindparam("secret_hash"), api_keys.c.revoked_at.is_(None))
)


def find_caller(engine: Engine, secret_hash: str) -> Caller | None:
    """Return the account and key for the hash of an active secret, or None."""
    with engine.connect() as conn:
        row = conn.execute(_SELECT_CALLER, {"secret_hash": secret_hash}).first()
    if row is None:
        return None
    return Caller(
        key_id=row.id,
        account_id=row.account_id,
        account_name=row.name,
        models=_parse_models(row.models),
    )


def revoke_key(engine: Engine, key: str) -> bool:
    """Revoke a key given its secret or its id; return whether an active key was revoked."""
    if key.startswith(KEY_PREFIX):
        which = api_keys.c.secret_hash == hash_secret(key)
    elif key.isdigit():
        which = api_keys.c.id == int(key)
    else:
        return False
    with writing(engine) as conn:
        result = conn.execute(
            update(api_keys)
            .where(which, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    return result.rowcount == 1


def list_keys(engine: Engine) -> list[KeyInfo]:
    """Return every key, oldest first."""
    query = (
        select(api_keys, accounts.c.name.label("account_name"))
        .join(accounts, accounts.c.id == api_keys.c.account_id)
        .order_by(api_keys.c.id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        KeyInfo(
            key_id=row.id,
            account_name=row.account_name,
            hint=row.hint,
            models=_parse_models(row.models),
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]
