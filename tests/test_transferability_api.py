"""POST /v1/datasets/{id}/transferability: base models scored from frozen pretrained features."""

import pytest
from fastapi.testclient import TestClient

from service.context import AppContext
from tests.conftest import digits_split, zip_of_classes
from tests.test_api import assert_error, ready_dataset, upload
from worker.engine import get_base_model_info


@pytest.fixture
def digits(client: TestClient, context: AppContext, auth: dict[str, str]) -> str:
    return ready_dataset(client, context, auth, classes=4, per_class=30)


def test_scores_the_real_pretrained_backbone_per_layer_group(
    client: TestClient, auth: dict[str, str], digits: str
) -> None:
    response = client.post(
        f"/v1/datasets/{digits}/transferability",
        headers=auth,
        json={"base_models": ["efficientnet_lite0"], "image_size": 64},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    train_images = sum(
        c["train"]
        for c in client.get(f"/v1/datasets/{digits}", headers=auth).json()["class_counts"].values()
    )
    assert body["images"] == train_images
    (score,) = body["ranking"]
    groups = get_base_model_info("efficientnet_lite0").group_names
    assert [g["group"] for g in score["groups"]] == list(groups)
    # ImageNet features separate four digit classes far better than chance (0.25).
    assert score["linear_probe_accuracy"] > 0.7
    # The top group's pooled output is the backbone's output: the same score.
    assert score["groups"][-1]["logme"] == pytest.approx(score["logme"])
    # Deeper features carry more about the labels than the stem's few channels.
    assert score["logme"] > score["groups"][0]["logme"]
    assert 1 <= score["suggested_partial_groups"] <= len(groups) - 1


def test_max_images_draws_a_per_class_sample(
    client: TestClient, auth: dict[str, str], digits: str
) -> None:
    body = {"base_models": ["efficientnet_lite0"], "image_size": 64, "max_images": 20}
    response = client.post(f"/v1/datasets/{digits}/transferability", headers=auth, json=body)

    assert response.status_code == 200, response.text
    assert response.json()["images"] == 20


def test_bad_requests_name_the_base_model(
    client: TestClient, context: AppContext, auth: dict[str, str], digits: str
) -> None:
    path = f"/v1/datasets/{digits}/transferability"
    unknown = client.post(
        path, headers=auth, json={"base_models": ["efficientnet_lite0", "alexnet"]}
    )
    assert_error(unknown, 422, "unknown_base_model", "base_models[1]")
    missing = client.post(path, headers=auth, json={"base_models": ["resnet18"]})
    assert_error(missing, 422, "weights_unavailable", "base_models[0]")
    assert_error(client.post(path, headers=auth, json={"base_models": []}), 422, "invalid_request")

    pool, _ = digits_split()
    processing = upload(client, auth, zip_of_classes(pool[:20]))
    not_ready = client.post(
        f"/v1/datasets/{processing['id']}/transferability", headers=auth, json={}
    )
    assert_error(not_ready, 409, "dataset_not_ready")
