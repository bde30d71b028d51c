"""Property-based requests generated from the OpenAPI schema: the service never answers 5xx.

Every operation is fuzzed (query strings, multipart bodies with random bytes or tiny images as
the video, bad options); 503 would be overload, which this sequential run never causes, so any
5xx fails. Needs schemathesis (dev extra); without it this test is skipped and says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.service import Settings, create_app
from tests.api.fakes import FakeExtractor, fake_loader
from tests.api.live import LiveServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-uploads")


@pytest.fixture(scope="module")
def fuzz_schema(uploads: Path) -> Iterator[Any]:
    schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
    mp = pytest.MonkeyPatch()
    mp.setattr("api.service.app._load", fake_loader(FakeExtractor()))
    # jobs run after their request has answered: allow as many as the run can post
    app = create_app(Settings(runs=[], upload_dir=uploads, max_upload_mb=0.5, jobs_max=10_000))
    with TestClient(app):  # starts the lifespan: the run is loaded, the workers run
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    mp.undo()
    assert list(uploads.iterdir()) == []


def test_no_server_errors(fuzz_schema: Any) -> None:
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
    )

    strategy = st.one_of(
        fuzz_schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        fuzz_schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    seen: set[str] = set()

    @given(case=strategy)
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        seen.add(f"{case.method} {case.path}")
        response = case.call()
        assert response.status_code < 500, (case.as_curl_command(), response.text[:300])
        case.validate_response(
            response,
            checks=[not_a_server_error, content_type_conformance, response_schema_conformance],
        )

    check()
    assert {"POST /v1/predict", "POST /v1/similar", "GET /v1/models"} <= seen


def test_schemathesis_cli_runs_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``schemathesis run`` on a live server: every check but negative-data rejection, no
    warning. Schema-valid uploads carry a real clip (``tests/api/schemathesis_hooks.py``), so
    they must succeed; schemathesis builds negative cases from that real clip and then cannot
    tell them from positive ones, hence the one check left out (the 5xx test above covers
    negative data)."""
    pytest.importorskip("schemathesis", reason="pip install schemathesis")
    monkeypatch.setattr("api.service.app._load", fake_loader(FakeExtractor()))
    uploads = tmp_path / "uploads"
    settings = Settings(
        runs=[], upload_dir=uploads, max_upload_mb=0.5, upload_idle_timeout_s=3, jobs_max=10_000
    )
    app = create_app(settings)
    cli = Path(sys.executable).with_name("schemathesis")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
    }
    with LiveServer(app) as server:
        done = subprocess.run(
            [str(cli), "run", f"http://127.0.0.1:{server.port}/openapi.json",
             "--checks", "all", "--exclude-checks", "negative_data_rejection",
             "--max-examples", "15", "--workers", "1", "--seed", "1", "--request-timeout", "60"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Warning" not in out and "WARNINGS" not in out, out[-3000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", out)
    tested = re.search(r"Tested: (\d+)", out)
    assert selected and tested, out[-2000:]
    assert selected[1] == selected[2] == tested[1], out[-2000:]  # every operation was run
    assert list(uploads.iterdir()) == []
