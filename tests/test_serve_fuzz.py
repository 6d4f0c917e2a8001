"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis): whatever the body,
the server answers with a non-5xx status (503 'busy' aside) and an OpenAI-shaped error for failures."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from nextstep import NextStepPipeline
from nextstep.serving import Engine
from nextstep.serving.api import Limits, create_app
from nextstep.serving.metrics import Metrics

# Valid requests really generate images: keep them small so the fuzzing stays quick.
LIMITS = Limits(max_n=2, max_side=32, max_steps=3, max_body_bytes=64 * 1024, timeout_s=60)


@pytest.fixture(scope="module")
def schema():
    metrics = Metrics()
    engine = Engine(NextStepPipeline.from_pretrained(), slots=2, max_queue=8, gather_s=0.0,
                    on_batch=metrics.on_batch)
    # schemathesis calls the app as http://testserver: that is the name this server answers for.
    app = create_app(engine, limits=LIMITS, allowed_hosts=["testserver"], metrics=metrics)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()


# schemathesis's own pytest plugin does not work with this pytest, so the cases come from its
# hypothesis strategies directly.
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_no_request_body_makes_the_server_fail(schema, path):
    statuses = []

    @given(case=schema[path]["POST"].as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and path.endswith("generations"):
            case.body.setdefault("steps", 2)  # the model's default of 20 steps is slow for a fuzzer
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500 or response.status_code == 503, response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"]

    check()
    print(path, sorted(statuses))
    assert {400, 422} & set(statuses)  # the fuzzer reached the checks


@pytest.mark.parametrize("path", ["/metrics", "/health"])
def test_the_read_only_routes_answer(schema, path):
    @given(case=schema[path]["GET"].as_strategy())
    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call()
        assert response.status_code == 200, response.text

    check()
