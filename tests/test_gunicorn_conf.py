"""The hooks of the shipped gunicorn.conf.py, run in this process."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

CONF_PATH = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"


@pytest.fixture
def gunicorn_conf() -> Iterator[ModuleType]:
    """Load gunicorn.conf.py as gunicorn does: a plain module run once."""
    spec = importlib.util.spec_from_file_location("gunicorn_conf", CONF_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    gc.unfreeze()


def tracked_by_collections(thing: object) -> bool:
    """Return whether the garbage collector's passes walk this object."""
    return any(found is thing for found in gc.get_objects())


def test_a_worker_takes_what_it_loaded_out_of_the_collectors_passes(
    gunicorn_conf: ModuleType,
) -> None:
    loaded_with_the_app = {"routes": ["a", "b"]}
    assert tracked_by_collections(loaded_with_the_app)

    gunicorn_conf.post_worker_init(worker=None)

    made_while_serving = {"request": ["c"]}
    assert gc.get_freeze_count() > 0
    assert not tracked_by_collections(loaded_with_the_app)
    assert tracked_by_collections(made_while_serving)


class Node:
    """An object that can be part of a reference cycle and be watched through a weak reference."""

    other: Node


def test_garbage_left_by_loading_the_app_is_collected_not_frozen(
    gunicorn_conf: ModuleType,
) -> None:
    node = Node()
    node.other = node  # only the garbage collector can free a cycle
    watched = weakref.ref(node)
    del node
    gc.disable()  # no collection but the hook's own
    try:
        gunicorn_conf.post_worker_init(worker=None)
    finally:
        gc.enable()
    assert watched() is None
