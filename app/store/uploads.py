"""Upload directories DashScope gave out through the gateway, and who obtained them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, insert, select

from app.store.engine import writing
from app.store.tables import uploads


@dataclass(frozen=True)
class Upload:
    """An upload directory: the account that obtained it, its channel and its model."""

    upload_dir: str
    account_id: int
    channel: str
    model: str


def record_upload(
    engine: Engine,
    *,
    upload_dir: str,
    account_id: int,
    channel: str,
    model: str,
    now: datetime,
    expires_at: datetime,
) -> None:
    """Remember an upload directory for its account, channel and model until it expires."""
    with writing(engine) as conn:
        # DashScope gives a fresh directory per policy; one seen again (expired) is replaced.
        conn.execute(delete(uploads).where(uploads.c.upload_dir == upload_dir))
        conn.execute(
            insert(uploads).values(
                upload_dir=upload_dir,
                account_id=account_id,
                channel=channel,
                model=model,
                created_at=now,
                expires_at=expires_at,
            )
        )


def sticky_channel(engine: Engine, account_id: int, model: str, now: datetime) -> str | None:
    """Return the channel of the account's newest valid upload for the model, if any."""
    query = (
        select(uploads.c.channel)
        .where(
            uploads.c.account_id == account_id,
            uploads.c.model == model,
            uploads.c.expires_at > now,
        )
        .order_by(uploads.c.created_at.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        channel: str | None = conn.execute(query).scalar()
    return channel


def owned_uploads(
    engine: Engine, account_id: int, upload_dirs: list[str], now: datetime
) -> dict[str, Upload]:
    """Return the account's valid uploads among the given directories, by directory."""
    query = select(
        uploads.c.upload_dir, uploads.c.account_id, uploads.c.channel, uploads.c.model
    ).where(
        uploads.c.upload_dir.in_(upload_dirs),
        uploads.c.account_id == account_id,
        uploads.c.expires_at > now,
    )
    with engine.connect() as conn:
        return {row.upload_dir: Upload(*row) for row in conn.execute(query)}


def forget_expired_uploads(engine: Engine, now: datetime) -> int:
    """Delete the uploads DashScope no longer keeps; return how many."""
    with writing(engine) as conn:
        return conn.execute(delete(uploads).where(uploads.c.expires_at <= now)).rowcount
