"""The shared assignment steps: dense, and sparse on candidate shortlists."""

import numpy as np
import pytest

from ncbench.assignment import match, match_shortlists


def _shortlists(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    columns = np.argsort(-scores, axis=1)[:, :k]
    return columns, np.take_along_axis(scores, columns, 1)


@pytest.mark.parametrize("m", [300, 320])  # square (greedy start), and with surplus columns
def test_shortlist_matching_equals_the_dense_one_when_the_optimum_is_listed(m):
    rng = np.random.default_rng(0)
    n = 300
    scores = rng.normal(size=(n, m))
    scores[np.arange(n), rng.permutation(m)[:n]] += 3.0  # a likely partner for every row
    dense = match(scores)
    columns, values = _shortlists(scores, 40)
    assert (columns == dense[:, None]).any(1).all()  # every row's optimal partner is listed
    assert np.array_equal(match_shortlists(columns, values, m), dense)


def test_shortlist_matching_maximises_the_total_not_each_row():
    # Row 0 prefers column 0 slightly; row 1 has nothing else: the optimum gives column 0 to row 1.
    columns = np.array([[0, 1], [0, 2]])
    values = np.array([[0.9, 0.8], [0.95, 0.1]])
    assert match_shortlists(columns, values, 3).tolist() == [1, 0]


def test_rows_the_shortlists_cannot_place_are_minus_one_and_the_rest_one_to_one():
    columns = np.array([[0], [0], [0], [1]])
    values = np.array([[0.5], [0.9], [0.1], [0.3]])
    matched = match_shortlists(columns, values, 5)
    assert matched.tolist() == [-1, 0, -1, 1]


def test_a_square_graph_the_shortlists_cannot_fill_places_the_most_rows():
    # Three rows, three columns, rows 0 and 1 listing only column 0: one of them stays unplaced,
    # the one that scores it lower, and row 2 keeps column 1.
    matched = match_shortlists(np.array([[0], [0], [1]]), np.array([[0.2], [0.9], [0.5]]), 3)
    assert matched.tolist() == [-1, 0, 1]
