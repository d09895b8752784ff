"""Crafted numbers get a 4xx, never a 500: ids past the database's integer range, tokens whose id
part overflows or is not ASCII digits, NaN where JSON is expected; and whatever the server's own
OpenAPI description allows, generated, gets an answer that description documents."""

import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from support import token_for

from ncbench.attacks.submission import Submission, read_submission, write_submission
from ncbench.errors import NcbenchError


def get(served, path, token=None):
    headers = {"Authorization": f"Bearer {token or served['token']}".encode()}  # bytes: non-ASCII tokens too
    return httpx.get(served["url"] + path, headers=headers, timeout=30)


@pytest.mark.parametrize("row_id", [2**63, 2**64, 2**31, 0, -1])
def test_out_of_range_submission_and_plugin_ids_are_4xx(served, row_id):
    for route in ("submissions", "plugins"):
        answer = get(served, f"/api/v1/{route}/{row_id}")
        assert 400 <= answer.status_code < 500, (route, row_id, answer.status_code, answer.text)


def test_in_range_ids_still_reach_their_route(served):
    assert get(served, "/api/v1/submissions/1").status_code == 404  # none yet: the route's own answer
    assert get(served, "/api/v1/plugins/1").status_code == 404


@pytest.mark.parametrize(
    "token",
    ["ncb_" + "9" * 30 + "_x", "ncb_99999999999_x", "ncb_\u00b2_x", "ncb_1_", "ncb_-1_x", "ncb_1_x\u00e9"],
)
def test_crafted_tokens_are_401(served, token):
    assert get(served, "/api/v1/whoami", token=token).status_code == 401


def test_nan_in_submission_params_is_refused(tmp_path):
    path = write_submission(
        tmp_path / "nan.h5",
        Submission(
            challenge_id="x",
            attack="a",
            attack_version="1",
            encoded_ids=["e"],
            mapping=["p"],
            params={"alpha": math.nan},
        ),
    )
    with pytest.raises(NcbenchError, match="'params' is not valid JSON"):
        read_submission(path)


EXAMPLES_PER_ROUTE = 8
# Each plugin upload starts a sandboxed check: its refusals are tested in tests/test_verified.py.
NOT_PROBED = {"POST /api/v1/challenges/{challenge_id}/plugins"}


def test_every_answer_is_documented_and_none_is_a_server_error(served):
    """Property-based requests from the real server's own OpenAPI description (schemathesis), a
    few per route, derandomized: each answer's status, content type and shape are documented, and
    none is a 5xx. Last in the module: its uploads (a team of its own) reach the queue."""
    api = schemathesis.openapi.from_url(f"{served['url']}/openapi.json")
    auth = {"Authorization": f"Bearer {token_for(served['store'], 'schema')}"}
    probed = []
    for result in api.get_all_operations():
        operation = result.ok()
        if operation.label in NOT_PROBED:
            continue
        probed.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def probe(case):
            case.call_and_validate(headers=auth)

        probe()
    assert len(probed) == 12, probed
