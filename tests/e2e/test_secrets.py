"""No secret reaches the gateway's log: not a channel key, not a gateway key.

conftest.py runs this module after every other e2e test of the same gateway, and the gateway
fixture audits the log once more after gunicorn has stopped.
"""

from __future__ import annotations

import requests

from .conftest import (
    CHANNEL_KEYS,
    HTTP_TIMEOUT,
    REFUSED_MODEL,
    SIM_KEY,
    T2V,
    UNREACHABLE_MODEL,
    Gateway,
    Keys,
    bearer,
    query,
    submit,
)


def test_gunicorn_log_holds_no_key(gateway: Gateway, keys: Keys) -> None:
    # The paths most likely to log a secret, so the audit stands even when run alone.
    doomed = gateway.create_key("e2e-secrets")
    accepted = submit(gateway, doomed, T2V, "audit me")
    assert accepted.status_code == 200, accepted.text
    assert query(gateway, doomed, accepted.json()["output"]["task_id"]).status_code == 200
    gateway.revoke_key(doomed)
    assert submit(gateway, doomed).status_code == 401
    assert submit(gateway, SIM_KEY).status_code == 401  # a channel key offered as a client key
    assert submit(gateway, keys.alice, REFUSED_MODEL).status_code == 503
    assert submit(gateway, keys.alice, UNREACHABLE_MODEL).status_code == 503
    assert (
        requests.get(
            f"{gateway.url}/nope", headers=bearer(keys.bob), timeout=HTTP_TIMEOUT
        ).status_code
        == 404
    )

    log = gateway.log_text()
    assert "/alibailian/api/v1/services/aigc/video-generation/video-synthesis" in log
    assert len(gateway.issued_keys) >= 5
    assert len(CHANNEL_KEYS) == 4
    assert gateway.secrets_in_log() == []
