"""Property tests of the board's rules against hostile strings and repeated probing:
team-name folding, built-in attack names, length limits, CSV and Markdown exports, and the
Ladder that bounds what the public half reveals about the hidden split."""

import csv
import io
import math
import re
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ncbench.errors import NcbenchError
from ncbench.leaderboard.scoring import ChallengeInfo, ScoreResult
from ncbench.leaderboard.store import (
    MAX_LENGTHS,
    MAX_TEAM_NAME,
    Store,
    builtin_attack_names,
    check_lengths,
    check_team_name,
    ladder,
    ladder_step,
)
from ncbench.leaderboard.tables import FORMULA_STARTS, escape_markdown, to_csv, to_markdown
from ncbench.names import name_skeleton

ASCII_NAME = st.text(
    alphabet=string.ascii_lowercase + string.digits + "_.-", min_size=1, max_size=MAX_TEAM_NAME
).filter(lambda name: name[0].isalnum())
# Letters and digits that fold to ASCII letters: fullwidth forms, mathematical alphanumerics.
FULLWIDTH = {c: chr(ord(c) - 0x21 + 0xFF01) for c in string.ascii_letters + string.digits}


# -- team names --------------------------------------------------------------------------------


@given(st.text(max_size=80))
def test_every_team_name_is_refused_or_canonical(name):
    try:
        canonical = check_team_name(name)
    except NcbenchError as error:
        assert "\n" not in str(error)
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", canonical)
    assert check_team_name(canonical) == canonical


@given(ASCII_NAME, st.data())
def test_look_alike_spellings_of_a_team_are_the_same_team(name, data):
    def disguise(char):
        forms = [char, char.upper()]
        if char in FULLWIDTH:
            forms += [FULLWIDTH[char], FULLWIDTH[char.upper()]]
        if char.isalpha():
            forms.append(char + data.draw(st.sampled_from(["\u0301", "\u0308", "\u0327"])))  # combining accents
        return data.draw(st.sampled_from(forms))

    spelled = "".join(disguise(c) for c in name)
    assert check_team_name(spelled) == name


@given(ASCII_NAME.filter(lambda n: any(c in "aeopcx" for c in n)), st.data())
def test_a_team_name_with_a_cyrillic_look_alike_is_refused(name, data):
    cyrillic = dict(zip("aeopcx", "\u0430\u0435\u043e\u0440\u0441\u0445"))
    position = data.draw(st.sampled_from([i for i, c in enumerate(name) if c in cyrillic]))
    with pytest.raises(NcbenchError, match="team name"):
        check_team_name(name[:position] + cyrillic[name[position]] + name[position + 1 :])


# -- built-in attack names ---------------------------------------------------------------------

LOOKALIKE_LETTERS = {
    "a": ["\u0430", "\u03b1"],
    "e": ["\u0435"],
    "o": ["\u043e", "\u03bf", "0"],
    "c": ["\u0441"],
    "p": ["\u0440"],
    "i": ["\u0456", "1", "l"],
    "l": ["1", "I", "\u0456"],
    "m": ["rn"],
    "n": ["\u0578"],
}


@given(st.sampled_from(builtin_attack_names()), st.data())
def test_disguised_builtin_names_are_recognised(name, data):
    def disguise(char):
        if char == "-":
            return data.draw(st.sampled_from(["-", "_", " ", ".", "", "\u2010", "\u00a0"]))
        forms = [char, char.upper(), FULLWIDTH.get(char, char), char + "\u0301", *LOOKALIKE_LETTERS.get(char, [])]
        return data.draw(st.sampled_from(forms))

    disguised = "".join(disguise(c) for c in name)
    assert name_skeleton(disguised) == name_skeleton(name), disguised


@given(
    st.sampled_from(builtin_attack_names()),
    st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=6),
)
def test_a_name_that_only_starts_like_a_builtin_is_a_team_name(name, suffix):
    assert name_skeleton(f"{name}-{suffix}") != name_skeleton(name)


@given(st.text(alphabet=st.characters(categories=["Lo"]), min_size=1, max_size=30))
def test_names_in_other_scripts_are_not_taken_for_builtins(name):
    assert all(name_skeleton(name) != name_skeleton(builtin) for builtin in builtin_attack_names())


def test_the_builtin_names_are_the_ncbench_entry_points():
    assert {"gram-hungarian", "linear-inversion", "distribution-alignment", "chance", "oracle"} <= set(
        builtin_attack_names()
    )


@given(st.sampled_from(sorted(MAX_LENGTHS)), st.integers(min_value=0, max_value=20_000))
def test_every_stored_string_has_a_limit(field, length):
    text = "x" * length
    if length <= MAX_LENGTHS[field]:
        assert check_lengths({field: text}) == {field: text}
    else:
        with pytest.raises(NcbenchError, match=f"{field} is {length} characters"):
            check_lengths({field: text})


# -- exports -----------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            '=HYPERLINK("http://evil.invalid","win")',
            "@SUM(1+1)*cmd|' /C calc'!A0",
            "+1+1",
            "-2+3",
            "\t=1",
            "\r=1",
            "x\r=1+1",
            "x\n@SUM(1)",
            "<script>alert(1)</script>",
            "[x](javascript:alert(1))",
            "![p](http://evil.invalid/p.png)",
            "a|b",
            "**bold** _it_ `code` \\",
        ]
    ),
)


@given(st.lists(st.tuples(HOSTILE, HOSTILE), min_size=1, max_size=5))
def test_csv_cells_never_start_a_formula_and_keep_their_text(rows):
    frame = pd.DataFrame(rows, columns=["team", "attack"]).assign(reidentification=-0.5)
    text = to_csv(frame)
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    # One record per row: a line break inside a cell is quoted, so it cannot start a new row.
    assert parsed[0] == ["team", "attack", "reidentification"] and len(parsed) == len(rows) + 1
    for (team, attack), row in zip(rows, parsed[1:]):
        for original, cell in zip((team, attack), row[:2]):
            assert not cell.startswith(FORMULA_STARTS)
            assert cell == original or (cell == "'" + original and original.startswith(FORMULA_STARTS))
        assert row[2] == "-0.5"  # numbers stay numbers


MARKUP = re.compile(r"(?<!\\)[\[\]()!*_`|<>]")  # a markup character without its backslash


@given(HOSTILE)
def test_markdown_cells_are_inert(text):
    escaped = escape_markdown(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert "<" not in escaped and ">" not in escaped
    unescaped = re.sub(r"\\\\", "", escaped)  # drop escaped backslashes, then every special must be escaped
    assert not MARKUP.search(unescaped), escaped


@given(st.lists(st.tuples(HOSTILE, HOSTILE), min_size=1, max_size=4))
def test_markdown_table_keeps_its_columns_whatever_the_cells(rows):
    text = to_markdown(pd.DataFrame(rows, columns=["team", "attack"]).assign(score=0.5))
    for line in text.splitlines():
        assert len(re.findall(r"(?<!\\)\|", re.sub(r"\\\\", "", line))) == 4


def test_markdown_export_escapes_links_images_and_html():
    text = to_markdown(
        pd.DataFrame(
            {"attack": ["<script>alert(1)</script>", "[x](javascript:alert(1))", "![p](http://evil.invalid/p.png)"]}
        )
    )
    assert "<script>" not in text and "](" not in text and "![" not in text
    assert "&lt;script&gt;" in text and "\\[x\\]\\(javascript:alert\\(1\\)\\)" in text


# -- the Ladder --------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=60), st.integers(min_value=4, max_value=5000))
def test_ladder_changes_its_shown_score_a_bounded_number_of_times(values, n_public):
    margin, grid = ladder_step("reid_accuracy", n_public)
    shown = ladder(values, margin=margin, grid=grid)
    assert shown[0] == pytest.approx(round(values[0] / grid) * grid)
    assert all(b >= a for a, b in zip(shown, shown[1:]))  # never goes down
    assert all(abs(v / grid - round(v / grid)) < 1e-6 for v in shown)  # on the grid
    changes = sum(b != a for a, b in zip(shown, shown[1:]))
    assert changes <= math.floor(1 / (margin - grid / 2))  # however many submissions


# -- the swap probe, through the store ------------------------------------------------------


def probe_results(split, start_correct, pairs, team="mallory"):
    """Shown and exact public accuracies of a probe: a starting mapping, then one submission per
    pair (i, j) that swaps the two rows of that starting mapping."""
    n = len(split)
    public = split == 0
    truth = np.arange(n)
    start = truth.copy()
    wrong = np.flatnonzero(~start_correct)
    start[wrong] = np.roll(truth[wrong], 1)  # a derangement of the rows it gets wrong
    mappings = [start]
    for i, j in pairs:
        swapped = start.copy()
        swapped[[i, j]] = swapped[[j, i]]
        mappings.append(swapped)
    info = ChallengeInfo("nc7-reid-probe", "reid", "nc7", n, "c" * 64, "{}")
    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "board.db") as store:
        for k, mapping in enumerate(mappings):
            correct = mapping == truth
            metrics = {
                s: {"n": float((split == s).sum()), "chance": 1 / n, "reid_accuracy": float(correct[split == s].mean())}
                for s in (0, 1)
            }
            store.record_score(
                ScoreResult(info, "swap-probe", "1", {}, (), 1.0, f"{k:064x}", metrics), team=team, daily_limit=None
            )
        shown = store.results().sort_values("submission_id")["reid_accuracy"].to_numpy()
        exact = (
            store.results(include_private=True)
            .query("split == 'public'")
            .sort_values("submission_id")["reid_accuracy"]
            .to_numpy()
        )
    return shown, exact, int(public.sum())


def infer_membership(scores, pairs, n_public):
    """What the probe learns: rows whose half follows from the score change of their swap.
    A drop of two rows' worth means both public, no change both private (if the swap
    changed correctness of both), one row's worth is ambiguous."""
    known = {}
    for (i, j), score in zip(pairs, scores[1:]):
        moved = round(abs(scores[0] - score) * n_public)
        if moved == 2:
            known[i] = known[j] = 0
        elif moved == 0:
            known[i] = known[j] = 1
    return known


def test_six_swaps_of_a_perfect_mapping_learn_nothing_about_the_split():
    rng = np.random.default_rng(10)
    split = rng.permutation(np.repeat([0, 1], 16))
    pairs = [(2 * k, 2 * k + 1) for k in range(6)]
    shown, exact, n_public = probe_results(split, np.ones(32, bool), pairs)
    learned_exact = infer_membership(exact, pairs, n_public)
    assert len(learned_exact) >= 4 and all(split[r] == half for r, half in learned_exact.items())  # exact: it works
    assert len(set(shown)) == 1  # every swap shows the same score: the shown scores do not depend on the split


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=16, max_value=64),
    st.floats(min_value=0.2, max_value=1.0),
)
def test_swap_probes_from_any_mapping_infer_no_more_than_chance(seed, n, fraction_correct):
    rng = np.random.default_rng(seed)
    split = rng.permutation(np.arange(n) % 2)
    start_correct = rng.random(n) < fraction_correct
    assume(start_correct.any())
    rows = rng.permutation(n)
    pairs = [(int(rows[2 * k]), int(rows[2 * k + 1])) for k in range(n // 2)]
    shown, _, n_public = probe_results(split, start_correct, pairs)
    # The shown score never moves: a swap changes at most 2 of n/2 public items, below the
    # Ladder's margin sqrt(n/2)/(n/2). The probe learns the same thing whatever the split is.
    assert len(set(shown)) == 1
    learned = infer_membership(shown, pairs, n_public)
    correct = sum(split[r] == half for r, half in learned.items())
    assert correct <= (split == 1).sum()  # what "every row is private" gets: a guess, not knowledge
