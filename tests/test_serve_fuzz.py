"""Schemathesis against the service's own OpenAPI, in-process (ASGI), with all its checks.

Every generated request, schema-valid or not, must get an answer the schema documents:
status code, content type and body schema conform, schema-valid requests are accepted (2xx,
or 404 for an image id not in the gallery), schema-invalid ones refused with a 4xx, no 5xx.
The text routes' schema has a query and a list of them: both forms are generated, and a list
must be answered by as many answers, in its order (``check_query_list``).
A bounded number of cases with a fixed seed keeps it a CI test; ``test_serve_ray.py`` runs
the same test through Ray Serve (docs/serving.md).
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from hrem_ray.cli import main
from hrem_ray.serving.api import NPY, LocalBackend, build_app
from hrem_ray.serving.service import MAX_REGIONS, RetrievalService
from hrem_ray.testing import tiny_data_and_checkpoint

IMG_DIM = 24
API_KEY = "fuzz-key"
MAX_EXAMPLES = 40  # per operation; about 30 s on the 2-core machine
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # a fixed seed: the same cases on every run
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def npy_features(draw_rows: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """Valid ``application/x-npy`` bodies: JSON Schema cannot describe an .npy file."""

    def save(rows: int, values: list[float]) -> bytes:
        out = io.BytesIO()
        np.save(out, np.resize(np.asarray(values, np.float32), (rows, IMG_DIM)))
        return out.getvalue()

    return st.builds(
        save, draw_rows, st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=8)
    )


schemathesis.openapi.media_type(NPY, npy_features(st.integers(1, MAX_REGIONS)))
BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    """Base64 features whose bytes fit their shape: JSON Schema can state the shape and the
    alphabet but not that len(bytes) == 4 * n * d, nor that the float32s are finite."""
    feats = body.get("features") if isinstance(body, dict) else None
    if not isinstance(feats, dict):
        return body
    shape, data = feats.get("shape"), feats.get("base64")
    if (
        isinstance(data, str)
        and BASE64.match(data)
        and isinstance(shape, list)
        and len(shape) == 2
        and all(type(x) in (int, float) and float(x).is_integer() for x in shape)
        and 1 <= shape[0] <= MAX_REGIONS
        and shape[1] == IMG_DIM
    ):
        values = np.linspace(-1, 1, int(shape[0]) * IMG_DIM, dtype="<f4")
        feats = {**feats, "base64": base64.b64encode(values.tobytes()).decode()}
        return {**body, "features": feats}
    return body


# A schema-invalid request may also be refused for its size before it is parsed: a body past
# its encoding's limit is a 413, whatever else is wrong with it (schemathesis's default list
# of rejections lacks 413).
FUZZ_CONFIG = SchemathesisConfig.from_str("""
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5XX"]
""")


def check_query_list(case: Any, response: Any) -> str:
    """What no JSON Schema states: a list of queries gets one answer per query, in its order
    (a search answer echoes its query). Returns the form of the case's query: " list" or ""."""
    body = case.body
    if not (isinstance(body, dict) and isinstance(body.get("query"), list)):
        return ""
    if response.status_code == 200:
        answers = response.json()
        assert isinstance(answers, list) and len(answers) == len(body["query"]), answers
        if case.path == "/search/text":
            assert [a["query"] for a in answers] == body["query"]
    return " list"


def run_schemathesis(schema: Any, headers: dict[str, str]) -> dict[str, Any]:
    """Every operation of ``schema``, positive and negative cases, ``MAX_EXAMPLES`` of each,
    through ``case.call_and_validate`` (all of schemathesis's default checks) and
    ``check_query_list``. Returns the number of cases and the statuses seen (a list of
    queries counted apart: "POST /embed/text positive 200 list"); a failing check raises."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    seen: dict[str, int] = {}

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.method.upper()} {operation.path} {mode.value}"

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=headers)
            key = f"{label} {response.status_code}{check_query_list(case, response)}"
            seen[key] = seen.get(key, 0) + 1

        try:
            check()
        except Unsatisfiable:  # no schema-invalid request exists (a GET without parameters)
            if mode is GenerationMode.POSITIVE:
                raise

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    return {"operations": len(operations), "cases": sum(seen.values()), "statuses": seen}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("fuzz")
    data, ckpt = tiny_data_and_checkpoint(root, tiny_bert)
    main(["index", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--out", str(root / "gallery")])  # fmt: skip
    return build_app(LocalBackend(RetrievalService(ckpt, root / "gallery")), api_key=API_KEY)


@pytest.mark.timeout(120)
def test_openapi_conformance_in_process(app):
    report = run_schemathesis(
        schemathesis.openapi.from_asgi("/openapi.json", app, config=FUZZ_CONFIG),
        {"x-api-key": API_KEY},
    )
    print(f"\nschemathesis in-process: {report['cases']} cases, {report['operations']} "
          f"operations, no failure: {sorted(report['statuses'].items())}")  # fmt: skip
    assert report["operations"] == 6
    assert report["cases"] >= 6 * MAX_EXAMPLES // 2  # every operation ran
    # schema-valid requests reached the model on every POST
    for path in ("/search/text", "/search/image", "/embed/text", "/embed/image"):
        assert any(k.startswith(f"POST {path} positive 200") for k in report["statuses"]), path
    # both forms of the text routes' query were generated, served and checked
    for path in ("/search/text", "/embed/text"):
        for form in ("", " list"):
            assert f"POST {path} positive 200{form}" in report["statuses"], (path, form)
