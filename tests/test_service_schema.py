"""schemathesis against the real app over real HTTP: every operation, a fixed seed, a few hundred generated requests
(valid by the schema, and invalid ones), no answer a 5xx or at odds with the OpenAPI document (status, content type,
headers, body schema), and requests the schema forbids refused (issue 15, item 8).

schemathesis' pytest plugin does not run under this pytest, so the test drives its strategies with Hypothesis
directly: one property per operation and generation mode, failures collected and reported together.
"""

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving import Tree, running
from tests.serving import settings as service_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 40}  # per operation, at most


@pytest.fixture(scope="module")
def base_url(serving_tree: Tree, redis_url: str) -> Iterator[str]:
    with running(service_settings(serving_tree, redis_url=redis_url)) as url:
        yield url


def _property(operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str, calls: list[str]):
    @seed(15)
    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def prop(case: schemathesis.Case) -> None:
        calls.append(operation.label)
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

    return prop


def test_every_operation_answers_as_documented(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /recall", "POST /rank", "POST /events", "POST /admin/reload", "GET /metrics"} <= labels
    calls: list[str] = []
    failures = []
    for op in operations:
        for mode in EXAMPLES:
            try:
                _property(op, mode, base_url, calls)()
            except Unsatisfiable:  # an operation without parameters or body has no invalid request to make
                assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", op.label
            except Exception as err:  # every operation runs; all failures are reported together
                failures.append(f"{op.label} [{mode.value}]: {err}"[:2000])
    assert not failures, "\n\n".join(failures)
    assert len(calls) >= 200 and set(calls) == labels  # a few hundred cases reached the server, every operation
