"""Crafted numbers get a 4xx, never a 500: ids past the database's integer range, tokens whose id
part overflows or is not ASCII digits, NaN where JSON is expected; and whatever the server's own
OpenAPI description allows, generated, gets an answer that description documents."""

import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import token_for

from ncbench.attacks.submission import Submission, read_submission, write_submission
from ncbench.errors import NcbenchError
from ncbench.leaderboard.server import service
from ncbench.leaderboard.store import Store
from ncbench.leaderboard.verified import runs as verified


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
PLUGIN_ROUTE = "POST /api/v1/challenges/{challenge_id}/plugins"
# Plugin uploads aimed at the served challenge: the schema's own strings for the rest, so nearly
# all are refused before anything is stored; those that pass are queued as admission checks.
PLUGIN_EXAMPLES_ON_THE_CHALLENGE = 8
# A plugin the host refuses from its source before any sandbox starts (its check fails reading
# its declarations): a bounded number of them reach the check queue.
JUNK_PLUGIN = b"this is not Python(\n"


# The plugin route's fields depend on each other (a module only with an archive, a wheel's name
# tags) beyond what an OpenAPI pattern says: a schema-valid request may get its documented 400.
NOT_CHECKED = {PLUGIN_ROUTE: [positive_data_acceptance]}


def probe(operation, auth, strategy, examples):
    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def call(case):
        case.call_and_validate(headers=auth, excluded_checks=NOT_CHECKED.get(operation.label))

    call()


def test_every_answer_is_documented_and_none_is_a_server_error(served):
    """Property-based requests from the real server's own OpenAPI description (schemathesis), a
    few per route, derandomized: each answer's status, content type and shape are documented, and
    none is a 5xx. Last in the module: its uploads (a team of its own) reach the queue.

    The plugin route is probed on any challenge id the schema allows, then on the served
    challenge, then with a plugin file until the team's daily plugin runs are spent: each upload
    that gets through is an admission check, so their number is bounded by the daily limit, not by
    the examples, and the last answer is the documented 429."""
    api = schemathesis.openapi.from_url(f"{served['url']}/openapi.json")
    team = "schema"
    auth = {"Authorization": f"Bearer {token_for(served['store'], team)}"}
    probed = []
    for result in api.get_all_operations():
        operation = result.ok()
        probed.append(operation.label)
        probe(operation, auth, operation.as_strategy(), EXAMPLES_PER_ROUTE)
        if operation.label != PLUGIN_ROUTE:
            continue
        on_the_challenge = operation.as_strategy(path_parameters={"challenge_id": served["id"]})
        probe(operation, auth, on_the_challenge, PLUGIN_EXAMPLES_ON_THE_CHALLENGE)
        answers = []
        for _ in range(verified.DEFAULT_PLUGIN_DAILY_LIMIT + 1):
            case = operation.Case(
                path_parameters={"challenge_id": served["id"]},
                query={"class": "Plugin", "filename": "junk.py"},
                body=JUNK_PLUGIN,
                media_type="text/x-python",
            )
            answers.append(case.call_and_validate(headers=auth, excluded_checks=NOT_CHECKED[PLUGIN_ROUTE]).status_code)
        assert answers[-1] == 429, answers  # the daily plugin runs bound what the probe can queue
    assert len(probed) == 13 and PLUGIN_ROUTE in probed, probed
    with Store(service.db_url(None, served["store"]), create=False) as store:
        runs = verified.team_runs(store, team)
    assert 1 <= len(runs) <= verified.DEFAULT_PLUGIN_DAILY_LIMIT, runs
