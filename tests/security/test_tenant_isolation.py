"""Every route that takes an id, walked from the application's own route table: tenant B using
tenant A's ids gets 404 and none of A's data (issue 5, item 14). A new route is covered without
editing this test; one with a path parameter or a required body it cannot fill fails loudly."""

import re
from typing import Any

from fastapi.testclient import TestClient

from service.context import AppContext
from tests.conftest import digits_split, new_key, png_bytes
from tests.test_api import ready_dataset, small_spec
from worker import jobs

IMAGE = png_bytes(digits_split()[1][0][0])

# What each request sends as a body, for the operations that require one.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/v1/models/{name}/aliases/{alias}"): {"json": {"version": 1}},
    ("patch", "/v1/models/{name}"): {"json": {"tags": ["x"]}},
    ("patch", "/v1/models/{name}/versions/{version}"): {"json": {"tags": ["x"]}},
    ("post", "/v1/models/{name}/versions/{version}/predict"): {
        "files": [("images", ("a.png", IMAGE))]
    },
}


def test_no_route_lets_another_tenant_see_or_touch_anything(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    jobs.execute(context, job_id=job["id"])
    alias = client.put("/v1/models/digits/aliases/production", headers=auth, json={"version": 1})
    assert alias.status_code == 200, alias.text
    values = {
        "dataset_id": dataset_id,
        "job_id": job["id"],
        "name": "digits",
        "version": "1",
        "alias": "production",
        "artifact": "config.json",
    }
    secrets_of_a = ("digit_0", dataset_id, job["id"])
    intruder = new_key(context, "team-b")

    checked = []
    for template, operations in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        params = re.findall(r"\{([^}]+)\}", template)
        if not params:
            continue
        missing = [p for p in params if p not in values]
        assert not missing, f"{template}: add a value for {missing} to this test"
        path = template.format(**values)
        for method, operation in operations.items():
            body = BODIES.get((method, template), {})
            required_body = operation.get("requestBody", {}).get("required", False)
            assert body or not required_body, f"{method.upper()} {template}: add a body"
            response = client.request(method, path, headers=intruder, **body)
            assert response.status_code == 404, (method, path, response.text)
            leaked = [s for s in secrets_of_a if s in response.text and s not in path]
            assert not leaked, (method, path, leaked)
            checked.append(f"{method.upper()} {template}")

    # Tenant A still has everything: nothing the intruder sent changed or deleted it.
    assert client.get("/v1/models/digits/versions/production", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "succeeded"
    assert len(checked) >= 15, checked
