"""Every route, walked from the application's own route table (the dashboard's routes too, which
the OpenAPI schema leaves out): tenant B using tenant A's ids gets 404 and none of A's data
(issue 5, item 14; issue 14, item 3). A new route is covered without editing this test; one with
a path parameter or a required body it cannot fill fails loudly. The dashboard's bridge to the
API refuses state-changing requests that a page on another site could forge."""

import re
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.context import AppContext
from service.tables import ModelUpdate, ModelVersion
from service.updates.schemas import UpdateIn
from tests.conftest import digits_split, new_key, png_bytes
from tests.test_api import ready_dataset, small_spec
from worker import jobs

IMAGE = png_bytes(digits_split()[1][0][0])
BRIDGE = "/ui/api/v1/{path:path}"

# What each request sends as a body, for the operations that require one.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/v1/models/{name}/aliases/{alias}"): {"json": {"version": 1}},
    ("patch", "/v1/models/{name}"): {"json": {"tags": ["x"]}},
    # Empty: the owner is told 422 (say which form), anyone else 404 before the body is read.
    ("post", "/v1/models/{name}/versions/{version}/feedback"): {"json": {}},
    # Its defaults suffice: the owner is told 422 (no captured feedback), others 404.
    ("post", "/v1/models/{name}/updates"): {"json": {}},
    ("patch", "/v1/models/{name}/versions/{version}"): {"json": {"tags": ["x"]}},
    ("post", "/v1/models/{name}/versions/{version}/predict"): {
        "files": [("images", ("a.png", IMAGE))]
    },
    # The intruder sets its own webhook (no id in the path): nothing of A's is reachable
    # (a 422 here: a loopback URL is refused without THAW_WEBHOOK_ALLOW_PRIVATE).
    ("put", "/v1/webhook"): {"json": {"url": "http://127.0.0.1:9/hook"}},
    ("post", "/v1/jobs"): {"json": {}},
    ("post", "/v1/jobs/plan"): {"json": {}},
    ("post", "/v1/jobs/lr-find"): {"json": {}},
    # The transferability endpoint (on main, not yet on this branch): its defaults suffice.
    ("post", "/v1/datasets/{dataset_id}/transferability"): {"json": {}},
    ("post", "/v1/experiments"): {"json": {}},
    ("post", "/v1/experiments/{experiment_id}/promote"): {"json": {}},
}


def route_table(client: TestClient) -> list[tuple[str, str, bool]]:
    """(method, path template, has a body) for every route the application serves."""
    table = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        original = route.original_route
        methods = getattr(original, "methods", None) or set()
        has_body = getattr(original, "body_field", None) is not None
        for method in sorted(methods - {"HEAD"}):
            table.append((method.lower(), str(route.path), has_body))
    return table


@pytest.fixture
def tenant_a_world(client: TestClient, context: AppContext, auth: dict[str, str]) -> dict[str, str]:
    """Tenant A's dataset, finished job, model version and alias; the values to put in paths."""
    dataset_id = ready_dataset(client, context, auth)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    jobs.execute(context, job_id=job["id"])
    alias = client.put("/v1/models/digits/aliases/production", headers=auth, json={"version": 1})
    assert alias.status_code == 200, alias.text
    experiment = client.post(
        "/v1/experiments",
        headers=auth,
        json={
            "dataset": dataset_id,
            "model": "digits-exp",
            "base_models": ["efficientnet_lite0"],
            "strategies": ["scratch", "feature_extraction"],
            "settings": {"image_size": 64, "epochs": 1},
        },
    )
    assert experiment.status_code == 201, experiment.text
    # An update as its row (training one takes captured feedback): A reads it, B may not.
    with context.db.session() as session:
        version = session.scalars(select(ModelVersion)).one()
        update = ModelUpdate(
            tenant_id=version.model.tenant_id,
            model_id=version.model_id,
            from_version_id=version.id,
            status="failed",
            request={**UpdateIn().model_dump(mode="json"), "from_version": 1, "training_items": 0},
            holdout=[],
        )
        session.add(update)
        session.commit()
        update_id = update.id
    return {
        "update_id": update_id,
        "dataset_id": dataset_id,
        "job_id": job["id"],
        "experiment_id": experiment.json()["id"],
        "name": "digits",
        "version": "1",
        "alias": "production",
        "artifact": "config.json",
    }


def test_no_route_lets_another_tenant_see_or_touch_anything(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    tenant_a_world: dict[str, str],
) -> None:
    values = tenant_a_world
    secrets_of_a = ("digit_0", values["dataset_id"], values["job_id"], values["experiment_id"])
    intruder_key = new_key(context, "team-b")["Authorization"].removeprefix("Bearer ")
    # The API takes the bearer key; the dashboard takes the same key from its sign-in cookie,
    # and its bridge wants the header its own pages send on every request.
    intruder = {
        "Authorization": f"Bearer {intruder_key}",
        "Cookie": f"thaw_key={intruder_key}",
        "X-Thaw-UI": "1",
    }
    table = route_table(client)
    api_routes = [(m, t, b) for m, t, b in table if t.startswith("/v1/")]
    checked: list[str] = []
    # What the intruder got a 404 for, for tenant A to try afterwards: a route that 404s for
    # any reason (a wrong path, a broken lookup) must not pass as isolated.
    controls: list[tuple[str, str, str]] = []

    def attempt(method: str, template: str, path: str, has_body: bool) -> None:
        body = BODIES.get((method, template), {})
        assert body or not has_body, f"{method.upper()} {template}: add a body"
        response = client.request(method, path, headers=intruder, follow_redirects=False, **body)
        leaked = [s for s in secrets_of_a if s in response.text and s not in path]
        assert not leaked, (method, path, leaked)
        if not re.search(r"\{[^}]+\}", template):
            # Lists and pages without ids: whatever they answer, none of A's data is in it.
            # (`/readyz` is rightly 503 here: A's queued work has no live worker in this test.)
            if path != "/readyz":
                assert response.status_code < 500, (method, path, response.text)
        elif template.startswith("/ui/") and not template.startswith("/ui/api/"):
            # A dashboard page: the "Not found" page, with the API's 404 for another's id.
            assert response.status_code == 404, (method, path, response.text)
            assert "Not found" in response.text, (method, path, response.text)
        else:
            assert response.status_code == 404, (method, path, response.text)
        if re.search(r"\{[^}]+\}", template):
            controls.append((method, template, path))
        checked.append(f"{method.upper()} {path}")

    for method, template, has_body in table:
        if template == BRIDGE:
            # The bridge forwards to every API route: each is tried through it as well.
            for api_method, api_template, api_body in api_routes:
                if api_method == method:
                    path = "/ui/api" + format_path(api_template, values)
                    attempt(api_method, api_template, path, api_body)
            continue
        if template in ("/ui/login", "/ui/logout"):
            continue  # signing in and out touch no tenant's data
        attempt(method, template, format_path(template, values), has_body)

    # Tenant A still has everything: nothing the intruder sent changed or deleted it.
    assert client.get("/v1/models/digits/versions/production", headers=auth).status_code == 200
    job_id = values["job_id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "succeeded"
    assert [c for c in checked if c.startswith("GET /ui/jobs/")] == [f"GET /ui/jobs/{job_id}"]
    assert len([c for c in checked if c.startswith(("GET /ui/api/", "DELETE /ui/api/"))]) >= 15
    assert len(checked) >= 60, checked

    # The positive control: tenant A, on the very same paths, is not told "not found". Reads
    # first; then each change once (directly, not again through the bridge); then the event
    # streams (which end once the experiment's cancel has ended it); deletes last and deepest
    # first, so that deleting a parent does not make its children's paths vanish.
    owner = {"Authorization": auth["Authorization"], "Cookie": f"thaw_key={key_of(auth)}"}
    owner["X-Thaw-UI"] = "1"

    def phase(control: tuple[str, str, str]) -> tuple[int, int]:
        method, template, _ = control
        if method == "get":
            return (2 if template.endswith("/stream") else 0), 0
        return (3 if method == "delete" else 1), -template.count("/")

    ordered = sorted(
        (c for c in controls if c[0] == "get" or not c[2].startswith("/ui/api/")), key=phase
    )
    reads = [c for c in ordered if c[0] == "get"]
    changes = [c for c in ordered if c[0] != "get"]
    for method, template, path in ordered:
        body = BODIES.get((method, template), {})
        response = client.request(method, path, headers=owner, follow_redirects=False, **body)
        assert response.status_code != 404, (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)
    print(f"positive control: {len(reads)} reads, {len(changes)} changes")
    assert len(reads) >= 20, reads
    assert len(changes) >= 5, changes


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def format_path(template: str, values: dict[str, str]) -> str:
    params = re.findall(r"\{([^}:]+)(?::[^}]*)?\}", template)
    missing = [p for p in params if p not in values]
    assert not missing, f"{template}: add a value for {missing} to this test"
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: values[m.group(1)], template)


def test_dashboard_bridge_refuses_forged_requests(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")
    signed_in = {"Cookie": f"thaw_key={key}"}
    # A zip that is broken past its signature: accepted, then fails in the background.
    broken_zip = b"PK\x03\x04" + b"x" * 64
    uploaded = client.post("/v1/datasets", headers=auth, files={"file": ("a.zip", broken_zip)})
    assert uploaded.status_code == 202, uploaded.text
    dataset_id = uploaded.json()["id"]

    # Reads through the bridge work with the cookie alone.
    shown = client.get(f"/ui/api/v1/datasets/{dataset_id}", headers=signed_in)
    assert shown.status_code == 200, shown.text

    # A form posted from any page carries the cookie but cannot add a custom header.
    without_header = client.post("/ui/api/v1/jobs/job_x/cancel", headers=signed_in)
    assert without_header.status_code == 403, without_header.text
    # A script on another site that sends the header anyway is told apart by its Origin.
    forged = {**signed_in, "X-Thaw-UI": "1", "Origin": "https://evil.example"}
    cross_site = client.post("/ui/api/v1/jobs/job_x/cancel", headers=forged)
    assert cross_site.status_code == 403, cross_site.text
    # The browser asks first, and is never told the other site may send the header.
    preflight = client.options(
        "/ui/api/v1/jobs/job_x/cancel",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-thaw-ui",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-headers" not in preflight.headers

    # The dashboard's own pages, same origin and with the header, get through to the API.
    own_origin = {**signed_in, "X-Thaw-UI": "1", "Origin": str(client.base_url)}
    genuine = client.post("/ui/api/v1/jobs/job_x/cancel", headers=own_origin)
    assert genuine.status_code == 404, genuine.text
    assert genuine.json()["error"]["code"] == "job_not_found"
