"""The upload flow: getPolicy through the account's channel, and `oss://` files bound to it."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import responses
from flask import Flask
from flask.testing import FlaskClient

from app.store import find_caller, hash_secret, utcnow
from app.store.rates import forget_call_counts, take_call
from app.uploads import POLICY_SCOPE
from tests.conftest import BASE_CONFIG, INTL, PRIMARY, PRIMARY_UPSTREAM_KEY, bearer, new_key

API = "/alibailian/api/v1"
MODEL = "wan2.5-t2v-preview"
# A second channel for the same model, so that "no failover" can be seen.
CONFIG = BASE_CONFIG.replace(
    'models = ["wan2.2-t2v-plus"]', f'models = ["wan2.2-t2v-plus", "{MODEL}"]'
)


def policy(upload_dir: str) -> dict[str, Any]:
    """Return DashScope's getPolicy answer for an upload directory."""
    return {
        "request_id": "p",
        "data": {"upload_dir": upload_dir, "policy": "e30=", "signature": "s"},
    }


def get_policy(client: FlaskClient, key: str, model: str = MODEL) -> Any:
    """Ask the gateway for an upload policy."""
    return client.get(f"{API}/uploads?action=getPolicy&model={model}", headers=bearer(key))


def oss_submit(client: FlaskClient, key: str, url: str, model: str = MODEL) -> Any:
    """Submit with one uploaded image."""
    body = {"model": model, "input": {"prompt": "p", "img_url": url}}
    return client.post(
        f"{API}/services/aigc/video-generation/video-synthesis", json=body, headers=bearer(key)
    )


def test_policies_stick_to_one_channel_and_submits_follow_their_files(
    make_app: Callable[..., Flask], upstream: responses.RequestsMock
) -> None:
    app = make_app(CONFIG)
    client = app.test_client()
    key = new_key(app)
    for base in (PRIMARY, INTL):
        upstream.get(f"{base}/api/v1/uploads", json=policy(f"d/{base[-8:]}"))

    first = get_policy(client, key)
    assert first.status_code == 200, first.json
    upload_dir = first.json["data"]["upload_dir"]
    # The policy was asked of one channel with its own key; the next ones go to the same one.
    asked = upstream.calls[0].request
    assert "action=getPolicy" in asked.url
    assert f"model={MODEL}" in asked.url
    channel_base = PRIMARY if asked.url.startswith(PRIMARY) else INTL
    assert asked.headers["Authorization"].startswith("Bearer sk-upstream-")
    for _ in range(3):
        assert get_policy(client, key).status_code == 200
    assert all(call.request.url.startswith(channel_base) for call in upstream.calls)

    accepted = {"request_id": "s", "output": {"task_id": "t-1", "task_status": "PENDING"}}
    upstream.post(
        f"{channel_base}/api/v1/services/aigc/video-generation/video-synthesis", json=accepted
    )
    answer = oss_submit(client, key, f"oss://{upload_dir}/cat.png")
    assert answer.status_code == 200, answer.json
    sent = upstream.calls[-1].request
    assert sent.url.startswith(channel_base)
    assert sent.headers["X-DashScope-OssResourceResolve"] == "enable"
    # Unused mocks of the other channel's getPolicy are fine to leave: only one was asked.
    upstream.assert_all_requests_are_fired = False


def test_an_oss_file_of_another_account_or_model_is_refused_by_field(
    app: Flask, client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{PRIMARY}/api/v1/uploads", json=policy("d/alice"))
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    assert get_policy(client, alice).status_code == 200

    foreign = oss_submit(client, bob, "oss://d/alice/cat.png")
    unknown = oss_submit(client, alice, "oss://d/elsewhere/cat.png")
    other_model = oss_submit(client, alice, "oss://d/alice/cat.png", "wanx2.1-kf2v-plus")
    nul = oss_submit(client, alice, "oss://d/alice\x00/cat.png")  # no text PostgreSQL holds

    for answer in (foreign, unknown, other_model, nul):
        assert (answer.status_code, answer.json["code"]) == (400, "InvalidParameter")
        assert answer.json["message"].startswith("input.img_url: ")
    assert "another model" in other_model.json["message"]


def test_a_policy_whose_folder_holds_a_nul_is_relayed_but_binds_nothing(
    app: Flask, client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{PRIMARY}/api/v1/uploads", json=policy("d/alice\x00"))
    alice = new_key(app, "alice")

    answer = get_policy(client, alice)
    submit = oss_submit(client, alice, "oss://d/alice/cat.png")

    assert answer.status_code == 200
    assert (submit.status_code, submit.json["code"]) == (400, "InvalidParameter")


def test_get_policy_needs_a_key_and_an_allowed_model(app: Flask, client: FlaskClient) -> None:
    limited = new_key(app, "limited", ["wanx2.1-kf2v-plus"])
    assert get_policy(client, limited).json["code"] == "model_not_found"
    assert get_policy(client, new_key(app), "no-such-model").json["code"] == "model_not_found"
    assert client.get(f"{API}/uploads?action=getPolicy&model={MODEL}").status_code == 401
    assert PRIMARY_UPSTREAM_KEY not in str(get_policy(client, limited).json)


def test_a_key_past_its_policy_limit_is_throttled_by_every_worker(
    make_app: Callable[..., Flask], upstream: responses.RequestsMock
) -> None:
    # Two apps on one database: two workers (or instances) of one gateway.
    limited = CONFIG.replace("[upstream]", "[server]\nupload_policies_per_second = 3\n\n[upstream]")
    first, second = make_app(limited), make_app(limited)
    key, other_key = new_key(first), new_key(first, "other")
    engine = first.extensions["gateway"].engine
    caller = find_caller(engine, hash_secret(key))
    assert caller is not None
    # The key's three calls a second are used up for the next half minute, by whichever worker.
    start = utcnow()
    for offset in range(30):
        for _ in range(3):
            assert take_call(
                engine, caller.key_id, POLICY_SCOPE, start + timedelta(seconds=offset), 3
            )
    upstream.get(re.compile(r".*/api/v1/uploads"), json=policy("d/x"))  # whichever channel

    for app in (first, second):
        refused = get_policy(app.test_client(), key)
        assert refused.status_code == 429
        assert refused.json["code"] == "Throttling.RateQuota"
    assert len(upstream.calls) == 0  # DashScope was never asked
    assert get_policy(second.test_client(), other_key).status_code == 200  # the limit is per key


def test_calls_counted_at_once_never_pass_the_limit(make_app: Callable[..., Flask]) -> None:
    engines = [make_app().extensions["gateway"].engine for _ in range(2)]
    key = new_key(make_app())
    caller = find_caller(engines[0], hash_secret(key))
    assert caller is not None
    now = utcnow()
    with ThreadPoolExecutor(8) as pool:
        taken = list(
            pool.map(
                lambda i: take_call(engines[i % 2], caller.key_id, POLICY_SCOPE, now, 20),
                range(60),
            )
        )
    assert taken.count(True) == 20
    assert take_call(engines[0], caller.key_id, POLICY_SCOPE, now + timedelta(seconds=1), 20)
    assert forget_call_counts(engines[1], now + timedelta(seconds=1)) == 1
    assert take_call(engines[1], caller.key_id, POLICY_SCOPE, now, 20)  # that second is forgotten
