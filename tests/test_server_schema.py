"""Property-based checks of the server against its own ``/openapi.json`` (schemathesis): whatever
a client sends, no 5xx and no response that breaks the documented schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from helpers import random_model, tiny_config  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from minicpm import LLM  # noqa: E402
from minicpm.engine import EngineConfig  # noqa: E402
from minicpm.engine.async_engine import BackgroundEngine  # noqa: E402
from minicpm.server.app import ServerState, build_app  # noqa: E402


@pytest.fixture(scope="module")
def app_schema(default_model_dir: Path, tmp_path_factory):
    """A tiny random model with the default model's tokenizer: the real API, fast generation."""
    path = tmp_path_factory.mktemp("tiny-smol")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    random_model(tiny_config(vocab_size=49152, max_position_embeddings=256, rope_scaling=None)).save_pretrained(path)
    llm = LLM.from_pretrained(path, engine_config=EngineConfig(max_model_len=128, max_num_seqs=8))
    state = ServerState(engine=BackgroundEngine(llm.engine), tokenizer=llm.tokenizer, served_names=["tiny"])
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(state))
    state.engine.close()


# What the API promises: no server error, and statuses, content types, headers and bodies as
# documented. (Semantic refusals of schema-valid requests, e.g. a prompt longer than the context
# or top_logprobs without logprobs, are documented 400s, so "positive data acceptance" is not one.)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]


def test_no_5xx_and_responses_match_the_schema(app_schema) -> None:
    checked = []
    for result in app_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:
            if isinstance(case.body, dict) and case.body.get("stream"):
                case.body["stream"] = False  # a stream's body is events, not the JSON schema
                case.body.pop("stream_options", None)
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            case.validate_response(response, checks=CHECKS)

        check()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /tokenize"} <= set(checked)
