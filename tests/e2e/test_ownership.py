"""Tasks belong to accounts: other accounts cannot tell them from ids that never existed."""

from __future__ import annotations

import uuid
from typing import Any

import requests

from .conftest import (
    T2V,
    Gateway,
    Keys,
    Simulator,
    assert_native_error,
    query,
    submit,
)


def hidden(response: requests.Response) -> dict[str, Any]:
    """Check the one task_not_exist answer and return it without its request id."""
    body = assert_native_error(response, 400, "task_not_exist", "task_not_exist")
    assert set(body) == {"request_id", "code", "message", "data"}
    assert body["data"] is None
    return {
        "status": response.status_code,
        "content_type": response.headers["Content-Type"],
        "body": {name: value for name, value in body.items() if name != "request_id"},
    }


def submitted_task(gateway: Gateway, key: str) -> str:
    response = submit(gateway, key, T2V, "owned by alice")
    assert response.status_code == 200, response.text
    task_id: str = response.json()["output"]["task_id"]
    return task_id


def test_foreign_task_looks_exactly_like_an_unknown_or_malformed_id(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    task_id = submitted_task(gateway, keys.alice)
    assert query(gateway, keys.alice, task_id).status_code == 200
    upstream_queries = simulator.stats()["queries_by_task"].get(task_id, 0)

    foreign = hidden(query(gateway, keys.bob, task_id))
    unknown = hidden(query(gateway, keys.bob, str(uuid.uuid4())))
    unknown_to_alice = hidden(query(gateway, keys.alice, str(uuid.uuid4())))
    malformed = hidden(query(gateway, keys.bob, "not-a-task-id"))
    odd = hidden(query(gateway, keys.bob, "not%20a%20task%21"))
    too_long = hidden(query(gateway, keys.bob, "x" * 300))
    assert foreign == unknown == unknown_to_alice == malformed == odd == too_long
    # Another account's query never reached upstream on the owner's channel.
    assert simulator.stats()["queries_by_task"].get(task_id, 0) == upstream_queries


def test_every_key_of_the_account_sees_the_task(gateway: Gateway, keys: Keys) -> None:
    task_id = submitted_task(gateway, keys.alice)

    response = query(gateway, keys.alice_second, task_id)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    output = response.json()["output"]
    assert output["task_id"] == task_id
    assert output["task_status"] in {"PENDING", "RUNNING", "SUCCEEDED"}


def test_revoked_key_is_refused(gateway: Gateway, keys: Keys) -> None:
    task_id = submitted_task(gateway, keys.alice)
    doomed = gateway.create_key("e2e-alice")
    assert query(gateway, doomed, task_id).status_code == 200

    gateway.revoke_key(doomed)

    assert_native_error(
        query(gateway, doomed, task_id), 401, "InvalidApiKey", "Invalid API-key provided."
    )
    assert_native_error(submit(gateway, doomed), 401, "InvalidApiKey", "Invalid API-key provided.")
    # The account's other keys are untouched.
    assert query(gateway, keys.alice, task_id).status_code == 200


def test_task_list_shows_only_the_account_tasks(gateway: Gateway, keys: Keys) -> None:
    task_id = submitted_task(gateway, keys.alice)

    def listed(key: str) -> list[str]:
        response = requests.get(
            f"{gateway.api}/tasks",
            params={"page_size": 100},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return [item["task_id"] for item in response.json()["data"]]

    assert task_id in listed(keys.alice)
    assert task_id in listed(keys.alice_second)
    assert task_id not in listed(keys.bob)
