"""``?model=`` takes a run id, a run directory's name, or a head when one loaded run answers to
it (an ambiguous name is a 422 listing the candidates); the documentation routes are counted
under their own route label in ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.cli import main as cli_main
from api.service import Settings, create_app
from tests.api.conftest import Served


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The served gap and tp runs and a second gap run in another folder, also called run-gap."""
    root = tmp_path_factory.mktemp("names")
    other = root / "again" / served.gap.name
    train = ["train", "--store", str(served.store), "--head", "gap", "--out", str(other)]
    train += ["--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--no-plots"]
    assert cli_main([*train, "--no-probe", "--seed", "1"]) == 0
    settings = Settings(
        runs=[served.gap, served.tp, other], store=served.store, upload_dir=root / "uploads"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _ids(client: TestClient) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in client.get("/v1/models").json()["models"]:
        out.setdefault(m["head"], []).append(m["id"])
    return out


def _similar(client: TestClient, served: Served, model: str):  # type: ignore[no-untyped-def]
    return client.get("/v1/similar", params={"video_id": served.train[0], "model": model})


def test_a_run_is_named_by_id_directory_or_head(client: TestClient, served: Served) -> None:
    ids = _ids(client)
    (tp,) = ids["tp"]
    assert len(ids["gap"]) == 2
    for name in (tp, served.tp.name, "tp"):
        r = _similar(client, served, name)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == tp
    for gap in ids["gap"]:  # an id is always exact
        assert _similar(client, served, gap).json()["model"] == gap


@pytest.mark.parametrize("name", ["gap", "run-gap"])
def test_an_ambiguous_name_lists_the_candidates(
    client: TestClient, served: Served, name: str
) -> None:
    assert served.gap.name == "run-gap"
    r = _similar(client, served, name)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert f"model {name!r} names 2 loaded runs" in detail
    assert all(gap in detail for gap in _ids(client)["gap"])


def test_an_unknown_name_is_404_and_the_schema_lists_the_accepted_names(
    client: TestClient, served: Served
) -> None:
    r = _similar(client, served, "svm")
    assert r.status_code == 404 and "run directory's name" in r.json()["detail"]
    params = client.get("/openapi.json").json()["paths"]["/v1/similar"]["get"]["parameters"]
    (model,) = [p for p in params if p["name"] == "model"]
    ids = _ids(client)
    assert sorted(model["schema"]["enum"]) == sorted([*ids["gap"], *ids["tp"], "run-tp", "tp"])


def test_documentation_routes_have_their_own_metrics_label(client: TestClient) -> None:
    for path in ("/openapi.json", "/docs", "/redoc", "/docs-static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    client.get("/no/such/path")
    text = client.get("/metrics").text
    for route in ("/openapi.json", "/docs", "/redoc", "/docs-static"):
        assert f'framepool_requests_total{{method="GET",route="{route}",status="200"}}' in text
    assert 'route="unmatched",status="200"' not in text
    assert 'route="unmatched",status="404"' in text
