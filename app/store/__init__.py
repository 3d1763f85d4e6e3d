"""The gateway's durable state: accounts, keys and tasks (SQLAlchemy Core)."""

from app.store.engine import open_engine
from app.store.keys import (
    Caller,
    KeyInfo,
    create_key,
    find_caller,
    hash_secret,
    list_keys,
    revoke_key,
)
from app.store.tasks import (
    Task,
    claim_refresh,
    force_refresh,
    get_owned_task,
    list_owned_tasks,
    record_answer,
    record_task,
)
from app.store.time import utcnow

__all__ = [
    "Caller",
    "KeyInfo",
    "Task",
    "claim_refresh",
    "create_key",
    "find_caller",
    "force_refresh",
    "get_owned_task",
    "hash_secret",
    "list_keys",
    "list_owned_tasks",
    "open_engine",
    "record_answer",
    "record_task",
    "revoke_key",
    "utcnow",
]
