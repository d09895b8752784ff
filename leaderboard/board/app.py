"""The public leaderboard (Streamlit). Reads only the results database; never a key.

Run it with ``ncbench leaderboard serve --db PATH|URL``, or directly with
``streamlit run leaderboard/board/app.py -- --db PATH|URL``. The database also comes from the
``NCBENCH_DB`` environment variable (which is how ``serve`` passes it).

Strings a team chose (attack names, versions, parameters) reach the page only through elements
that show text as text (``st.dataframe``, ``st.text``, ``st.json``, widget options), never
through Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys

import altair as alt
import httpx
import pandas as pd
import streamlit as st

from ncbench.errors import NcbenchError
from ncbench.leaderboard import tables
from ncbench.leaderboard.board import SERVER_ENV, reachable_server, shown_server
from ncbench.leaderboard.metrics import BAND_BAD_ABOVE, BAND_GOOD_BELOW, privacy_band
from ncbench.leaderboard.store import DB_ENV, DEFAULT_DAILY_LIMIT, ORIGIN_ORGANIZER, Store, database_url

# (title, URL slug): each page has its own link, http://board/?page=SLUG.
PAGES = (
    ("Attack x preset", "matrix"),
    ("Verified", "verified"),
    ("Self-reported", "self-reported"),
    ("Challenges", "challenges"),
    ("Submission", "submission"),
    ("Privacy vs utility", "privacy-utility"),
    ("Privacy vs depth", "privacy-depth"),
    ("Take part", "take-part"),
)
BAND_COLOURS = {"good": "#c8e6c9", "moderate": "#ffe0b2", "bad": "#ffcdd2"}
CHANCE_COLOUR = "#eeeeee"
WIDE = st.column_config.TextColumn(width="large")  # names and results are read whole, never cut
PERCENT = st.column_config.NumberColumn(format="percent")
# Depths 0 ... 44 are near geometric: an ordinal axis keeps the shallow ones apart.
DEPTH_AXIS = alt.X("depth:O", title="private blocks (depth)")


def database_argument() -> str | None:
    """``--db`` after ``--`` on the streamlit command line, else the environment variable."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--db")
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.db or os.environ.get(DB_ENV)


@st.cache_resource
def open_store(url: str) -> Store:
    return Store(url, create=False)


NOT_RUN = "not run"  # a matrix cell with no organizer run behind it
REFRESH_S = 15  # the board redraws itself while submissions are being scored


def percent(value) -> str:
    return NOT_RUN if pd.isna(value) else f"{100 * value:.1f}%"


def style_matrix(matrix: pd.DataFrame):
    """Percentages, each cell coloured by its privacy band; the chance row in grey. The cells are
    text, so that a missing run reads "not run" (Streamlit draws a missing number as None, whatever
    the styler's na_rep)."""
    colours = matrix.map(
        lambda value: "" if pd.isna(value) else f"background-color: {BAND_COLOURS[privacy_band(value)]}"
    )
    if tables.CHANCE_ROW in colours.index:
        colours.loc[tables.CHANCE_ROW] = f"background-color: {CHANCE_COLOUR}"
    return matrix.map(percent).style.apply(lambda _: colours, axis=None)


def band_legend() -> str:
    return (
        f"Privacy bands of the original NeuraCrypt challenge: below {BAND_GOOD_BELOW:.0%} re-identification "
        f"is **good** (green), {BAND_GOOD_BELOW:.0%}-{BAND_BAD_ABOVE:.0%} **moderate** (amber), above "
        f"{BAND_BAD_ABOVE:.0%} **bad** (red): the encoding does not protect the images."
    )


TASK_HELP = (
    "reid: match encodings to plaintexts; invert: re-identify by nearest reconstruction; "
    "transfer: nearest-neighbour accuracy of predicted target encodings; link: R-precision of the "
    "pairs claimed to be one image or patient across two hospitals' keys"
)


def page_matrix(store: Store) -> None:
    st.header("Best re-identification: attack x preset")
    board = tables.board(store.results())
    organizer = board[board["origin"] == ORIGIN_ORGANIZER]
    if organizer.empty:
        st.info("No organizer runs of the built-in attacks yet. Teams' files are on the **Self-reported** page.")
        return
    tasks = sorted(organizer["task"].unique())
    task = st.selectbox("Task", tasks, index=tasks.index("reid") if "reid" in tasks else 0, help=TASK_HELP)
    half = st.radio(
        "Scoring half",
        ["public", "private"],
        horizontal=True,
        help="The private half is shown only for challenges the organizers have closed.",
    )
    matrix = tables.attack_preset_matrix(board, task=task, split=half, presets=tables.preset_order(store.challenges()))
    if matrix.empty:
        st.info(f"No {half}-half results for the {task} task yet.")
        return
    st.dataframe(style_matrix(matrix))
    st.caption(
        band_legend() + " Rows are the built-in attacks as the organizers ran them (verified); teams' "
        "own files are listed under **Self-reported**. The last row is the chance level 1/N (the "
        f"largest, when a preset has challenges of several sizes). *{NOT_RUN}*: no organizer run of "
        "that attack on that preset yet."
    )
    st.subheader("Behind each cell")
    st.dataframe(tables.readable_times(tables.matrix_provenance(board, task=task, split=half)), hide_index=True)
    tested = sorted(set(organizer.loc[organizer["release"] != "", "preset"]))
    if tested:
        st.warning(
            f"Some challenges behind this table are test releases (key public) on presets "
            f"{'; '.join(tested)}: their numbers measure the attacks, not the secrecy of a key."
        )


def page_verified(store: Store) -> None:
    from ncbench.leaderboard.verified import runs as verified

    st.header("Verified track: attack code the organizers ran on fresh hidden releases")
    st.caption(
        "Each run is a team's plugin (or a built-in attack, the reference rows) run by the organizers in a "
        "sandbox (no network, nothing of the server visible, limits on memory, CPU, time, processes and "
        "output) on K evaluation releases it has never seen, each with a fresh key. Each key's seed was "
        "committed to before the run (sha256, below) and is revealed when the challenge closes, so anyone "
        "can rebuild the releases and check every score."
    )
    results = verified.results(store)
    if results.empty:
        st.info(
            "No verified runs yet. Teams send plugins with `ncbench submit --plugin FILE.py:Class` (or "
            "`DIST.whl:module:Class`); organizers "
            "add the built-in reference rows with `ncbench leaderboard verify-builtins`."
        )
        return
    summary = tables.verified_summary(results)
    tasks = sorted(summary["task"].unique())
    task = st.selectbox(
        "Task", tasks, index=tasks.index("reid") if "reid" in tasks else 0, help=TASK_HELP, key="verified-task"
    )
    matrix = tables.verified_matrix(summary, task=task, presets=tables.preset_order(store.challenges()))
    if matrix.empty:
        st.info(f"No scored verified run for the {task} task yet.")
    else:
        st.dataframe(matrix.reset_index(), hide_index=True, column_config={"attack": WIDE})
        st.caption(
            f"Best run of each attack on each preset and release size N: mean re-identification over its K "
            f"evaluation releases ± the sample standard deviation over the K keys. {tables.UNSANDBOXED}: run by "
            "the organizers without the sandbox (local testing), not comparable. [bf16]: the challenge was encoded "
            "in bf16 at the organizers' request; every other release is fp32, the same bytes on any CPU."
        )
    st.subheader("Runs")
    st.dataframe(
        tables.verified_runs(summary[summary["task"] == task]),
        hide_index=True,
        column_config={"attack": WIDE, "result": WIDE},
    )
    st.caption("wall_s and cpu_s: seconds per evaluation release; peak_memory_mb: the largest of the run.")
    st.subheader("Re-identification against compute")
    axis = st.radio(
        "Compute",
        ["wall_s", "cpu_s"],
        horizontal=True,
        key="verified-compute",
        help="Seconds per evaluation release, measured by the sandbox.",
    )
    points = tables.verified_compute(results[results["task"] == task])
    if not points.empty:
        chart = (
            alt.Chart(points)
            .mark_point(size=80, filled=True)
            .encode(
                x=alt.X(
                    f"{axis}:Q",
                    title=f"{axis.replace('_s', '')} seconds per evaluation release",
                    scale=alt.Scale(type="log"),
                ),
                y=alt.Y(
                    "reidentification:Q",
                    title="re-identification",
                    scale=alt.Scale(domain=[0, 1]),
                    axis=alt.Axis(format="%"),
                ),
                color="attack:N",
                shape="sandboxed:N",
                tooltip=["attack", "preset", "reidentification", axis],
            )
        )
        st.altair_chart(chart, width="stretch")
    st.subheader("Commitments")
    st.caption(
        "sha256 of each evaluation seed, the key commitment and the sha256 of the release, stored before the "
        "plugin ran. Once the challenge closes the seed and the command that rebuilds the release byte for "
        "byte appear here."
    )
    st.dataframe(tables.readable_times(tables.verified_commitments(verified.commitments(store))), hide_index=True)


def page_self_reported(store: Store) -> None:
    st.header("Self-reported submissions")
    st.caption(
        "Files sent by teams and scored against the hidden key. The scores are real; what a file says "
        "about itself (attack name, parameters, knowledge it assumed) is the team's own claim and cannot "
        "be checked, so attacks are shown as team/attack. Public-half scores follow the Ladder: a new "
        "score shows only when it beats the team's best shown score by a margin, rounded to 1%."
    )
    board = tables.board(store.results())
    rows = tables.self_reported(board)
    if rows.empty:
        st.info("No self-reported submissions yet. See **Take part** to send one.")
        return
    tasks = sorted(rows["task"].unique())
    task = st.selectbox("Task", tasks, index=tasks.index("reid") if "reid" in tasks else 0, help=TASK_HELP)
    halves = [h for h in ("public", "private") if h in set(rows["split"])]
    half = st.radio(
        "Scoring half",
        halves,
        horizontal=True,
        help="The private half is shown only for challenges the organizers have closed.",
    )
    st.dataframe(
        tables.readable_times(tables.self_reported(board, task=task, split=half)),
        hide_index=True,
        column_config={
            "reidentification": st.column_config.NumberColumn("re-identification", format="percent"),
            "chance": st.column_config.NumberColumn(format="percent"),
        },
    )


def page_challenges(store: Store) -> None:
    st.header("Challenges")
    challenges = store.challenges()
    if challenges.empty:
        st.info("No challenges have been scored yet.")
        return
    labels = {
        row.challenge_id: f"{row.challenge_id} ({row.task}, {row.preset}, n={row.n_encoded}, "
        f"{'closed' if row.closed_utc else 'open, blind' if row.blind else 'open'}, {row.submissions} submissions"
        f"{', ' + tables.TEST_RELEASE if row.test_release else ''})"
        for row in challenges.itertuples()
    }
    st.dataframe(tables.challenge_listing(challenges), hide_index=True)
    st.caption("release: *secret key* for a real challenge, or a test release whose key is public. Times are UTC.")
    choice = st.selectbox("Challenge", list(labels), format_func=labels.get)
    chosen = challenges.set_index("challenge_id").loc[choice]
    if chosen["blind"] and pd.isna(chosen["closed_utc"]):
        st.info(f"A {tables.BLIND}. Its scored submissions so far:")
        entries = store.entries(choice).assign(state="scored")
        entries["attack"] = [tables.shown_attack(*row) for row in entries[["team", "attack", "origin"]].values]
        st.dataframe(tables.readable_times(entries), hide_index=True)
        return
    board = tables.board(store.results(challenge_id=choice))
    if board.empty:
        st.info("No scored submissions for this challenge yet.")
        return
    left, middle, right = st.columns(3)
    team = left.text_input("Team contains")
    attacks = middle.multiselect("Attacks", sorted(board["attack"].unique()))
    halves = ["all"] + [h for h in ("public", "private") if h in set(board["split"])]
    half = right.selectbox("Half", halves)
    shown = tables.filter_board(board, team=team, attacks=attacks, split=None if half == "all" else half)
    st.dataframe(
        tables.readable_times(shown),
        hide_index=True,
        column_config={
            "reidentification": st.column_config.NumberColumn("re-identification", format="percent"),
            "chance": st.column_config.NumberColumn(format="percent"),
        },
    )
    st.caption(f"{len(shown)} of {len(board)} rows. Click a column header to sort.")
    st.download_button("Download CSV", tables.to_csv(shown), file_name=f"{choice}.csv", mime="text/csv")


def page_submission(store: Store) -> None:
    st.header("Submission details")
    board = tables.board(store.results())
    if board.empty:
        st.info("No scored submissions yet.")
        return
    first = board.drop_duplicates("submission_id").set_index("submission_id")
    labels = {
        int(i): f"submission {i}: {row.team} - {row.attack} {row.attack_version} on {row.challenge_id}"
        for i, row in first.iterrows()
    }
    chosen = st.selectbox(
        "Submission",
        sorted(labels, reverse=True),
        format_func=labels.get,
        help="The id `ncbench submit` printed (`ncbench status ID` looks it up); verified runs have run ids of "
        "their own, on the Verified page.",
    )
    details = store.submission(chosen)
    public = details["metrics"].get("public", {})
    headline = public.get("nn_accuracy" if details["task"] == "transfer" else "reid_accuracy", float("nan"))
    cols = st.columns(4)
    cols[0].metric("Re-identification (public)", percent(headline), help=privacy_band(headline))
    cols[1].metric("Chance", percent(public.get("chance", float("nan"))))
    cols[2].metric("Patch-position accuracy", percent(public.get("patch_position_accuracy", float("nan"))) or "n/a")
    cols[3].metric("Runtime", f"{details['runtime_s']:.1f} s" if details["runtime_s"] is not None else "n/a")
    metrics = pd.DataFrame(details["metrics"])
    metrics.index.name = "metric"
    st.subheader("Metrics per scoring half")
    st.dataframe(metrics)
    if "private" not in details["metrics"]:
        st.caption("The private half stays hidden until the organizers close the challenge.")
    if details["test_release"]:
        st.warning(
            "This challenge is a test release: its key is public, so this score says nothing about the encoding."
        )
    st.subheader("Attack")
    organizer = details["origin"] == ORIGIN_ORGANIZER
    if organizer:
        st.caption("A built-in attack, run by the organizers (verified).")
    else:
        st.caption(
            "Self-reported: the attack name, version, parameters and assumed knowledge below are the "
            "team's own claims, which cannot be checked."
        )
    # Plain text only: these strings come from the submitted file.
    st.text(
        "\n".join(
            [
                f"attack:     {tables.shown_attack(details['team'], details['attack'], details['origin'])} "
                f"{details['attack_version']}",
                f"team:       {details['team']}",
                f"challenge:  {details['challenge_id']} ({details['task']}, preset {details['preset']})",
                f"submitted:  {tables.utc_minutes(details['created_utc'])}",
                f"file:       sha256 {details['sha256']}",
                f"assumes:    {', '.join(details['knowledge']) or 'nothing declared'}",
                *(f"note:       {note}" for note in details["notes"]),
            ]
        )
    )
    st.json(details["params"])


def page_privacy_utility(store: Store) -> None:
    st.header("Privacy vs utility")
    utility = store.utility()
    if utility.empty:
        st.info("No utility results yet. The utility baseline records them (see `ncbench baseline --help`).")
        return
    summary = tables.privacy_utility(tables.board(store.results()), utility)
    points = summary.dropna(subset=["best_reidentification"])
    if not points.empty:
        base = alt.Chart(points).encode(
            x=alt.X(
                "best_reidentification:Q",
                title="best re-identification of any attack (public half)",
                scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%"),
            ),
            y=alt.Y("encoded_auc:Q", title="mean AUC of models trained on encodings", scale=alt.Scale(domain=[0.4, 1])),
        )
        dots = base.mark_circle(size=120).encode(
            color=alt.Color(
                "band:N", scale=alt.Scale(domain=list(BAND_COLOURS), range=["#2e7d32", "#ef6c00", "#c62828"])
            ),
            tooltip=[
                "preset",
                alt.Tooltip("best_reidentification:Q", format=".1%"),
                alt.Tooltip("encoded_auc:Q", format=".3f"),
                alt.Tooltip("raw_auc:Q", format=".3f"),
            ],
        )
        st.altair_chart(dots + base.mark_text(dy=-12).encode(text="preset:N"), width="stretch")
    st.dataframe(summary, hide_index=True, column_config={"best_reidentification": PERCENT})
    st.caption(
        "best_reidentification (percent of images re-identified): of the built-in attacks as the organizers "
        "ran them. AUCs are areas under the ROC curve, from 0.5 (chance) to 1. raw_auc: the same models "
        "trained on the plaintext images (the utility an encoding can at best keep)."
    )
    st.subheader("AUC per finding (latest run of each preset)")
    st.dataframe(tables.utility_by_label(utility))
    with st.expander("Settings of these runs"):
        latest = tables.latest_utility(utility).drop_duplicates("preset")
        st.json({row.preset: row.settings for row in latest.itertuples()})
    intervals = tables.utility_intervals(utility)
    if not intervals.empty:
        st.subheader("Over seeds")
        st.dataframe(_with_interval_text(intervals, {"auc": False, "vs_raw": True}), hide_index=True)
        st.caption(
            "One row per model and setting, every recorded seed (`ncbench baseline utility --seeds S`). `auc`: mean "
            "over seeds of each seed's mean AUC over findings, with its 95% t-interval (`auc_95ci`, blank with one "
            "seed). `vs_raw`: the paired difference encoded - raw over the `vs_raw_seeds` seeds where the raw model "
            "was trained on the same images; an interval below 0 is a utility cost beyond the seed-to-seed noise."
        )
    several = tables.multi_site_summary(utility)
    if several.empty:
        return
    st.subheader("Several sites")
    st.caption(
        "The paper's claim that hospitals with independent private encoders can collaborate: the images are "
        "split between K sites, each encoding its share under its own key (`ncbench baseline utility --sites K`). "
        "Mean AUC over sites and findings, every model scored on each site's held-out images. `per_site_auc`: each "
        "site trains on its own encodings only; `union_auc`: one model on every site's encodings; `one_key_auc`: the "
        "same images under one key (the upper bound); `raw_auc`: plaintext patches. `union_gain` = union - per-site "
        "(does collaboration help), `key_cost` = one-key - union (what independent keys cost). Latest run of each "
        "preset; below, the same per held-out site (`eval_site`) and the mean over sites."
    )
    # A model no run trained (`--no-raw`, `--no-one-key`) leaves a column without a value: not shown.
    st.dataframe(several.dropna(axis=1, how="all"), hide_index=True)
    st.dataframe(tables.multi_site_table(tables.latest_multi_site(utility)).dropna(axis=1, how="all"), hide_index=True)
    over_seeds = tables.multi_site_intervals(utility)
    st.markdown("**Several sites, over seeds**")
    st.dataframe(
        _with_interval_text(over_seeds, {"site": False, "union": False, "union_gain": True, "key_cost": True}),
        hide_index=True,
    )
    st.caption(
        "One row per preset, number of sites and training images per site, every recorded seed. `union_gain`: the "
        "paired difference union - per-site over seeds (each seed's mean over sites and findings), with its 95% "
        "t-interval: collaboration helps beyond the noise where the interval lies above 0. `key_cost`: one-key - "
        "union, where the one-key model was trained."
    )


def _with_interval_text(frame: pd.DataFrame, columns: dict[str, bool]) -> pd.DataFrame:
    """``frame`` as text: each ``{column}_low`` / ``_high`` pair replaced by one column
    ``{column}_95ci`` (signed for differences: ``columns[column]`` True) after ``column``, the
    other AUCs to three decimals, and a missing value (no raw model to pair with, a run without
    a depth) blank, since Streamlit draws a missing number as None."""
    shown = frame.copy()
    aucs = {*columns, "one-key"}
    for column in frame.columns:
        if column.endswith(("_low", "_high")) or frame[column].dtype.kind in "iu":
            continue
        form = ("+.3f" if columns.get(column) else ".3f") if column in aucs else ".0f"  # else counts, depths
        shown[column] = [
            "" if pd.isna(value) else f"{value:{form}}" if isinstance(value, float) else str(value)
            for value in frame[column]
        ]
    for column, signed in columns.items():
        text = [
            tables.interval_text(low, high, signed=signed)
            for low, high in zip(frame[f"{column}_low"], frame[f"{column}_high"])
        ]
        shown.insert(shown.columns.get_loc(column) + 1, f"{column}_95ci", text)
        shown = shown.drop(columns=[f"{column}_low", f"{column}_high"])
    return shown


def page_depth(store: Store) -> None:
    st.header("Privacy vs depth")
    table, challenges = tables.board(store.results()), store.challenges()
    # One colour domain for both attack charts: an attack keeps its colour from one to the other.
    names = [tables.CHANCE_ROW, *sorted(set(table.loc[table["origin"] == ORIGIN_ORGANIZER, "attack"]))]
    _reid_and_utility_against_depth(tables.depth_curve(table, challenges, store.utility()), names)
    _transfer_against_depth(tables.transfer_depth_curve(table, challenges), names)


def _reid_and_utility_against_depth(curve: pd.DataFrame, names: list[str]) -> None:
    if curve.empty:
        st.info(
            "No depth sweep recorded yet: `python benchmarks/depth.py` builds nc3 ... nc47 (0 to 44 private "
            "blocks), attacks each release and trains the utility model at each depth."
        )
        return
    utility_columns = ("encoded_auc", "utility_runs", "raw_auc")
    intervals = {"encoded_auc": ("encoded_auc_low", "encoded_auc_high"), "raw_auc": ("raw_auc_low", "raw_auc_high")}
    not_attacks = {"depth", tables.CHANCE_ROW, *utility_columns, *(c for pair in intervals.values() for c in pair)}
    attacks = [c for c in curve.columns if c not in not_attacks]
    _attack_chart(curve, attacks, "best re-identification (public half)", names)
    auc = pd.concat(
        [
            curve[["depth", model, low, high]].set_axis(["depth", "auc", "low", "high"], axis=1).assign(model=model)
            for model, (low, high) in intervals.items()
        ]
    )
    _depth_chart(
        auc.dropna(subset=["auc"]),
        DEPTH_AXIS,
        alt.Y("auc:Q", title="mean AUC over findings (95% interval over seeds)", scale=alt.Scale(domain=[0.4, 1])),
        "model",
        interval=("low", "high"),
    )
    # Text cells: a depth without a run of an attack, or without a utility run, reads "not run".
    shown = curve.assign(
        **{c: curve[c].map(percent) for c in [*attacks, tables.CHANCE_ROW]},
        **{c: curve[c].map(lambda v: NOT_RUN if pd.isna(v) else f"{v:.3f}") for c in ("encoded_auc", "raw_auc")},
        **{
            f"{c}_95ci": [tables.interval_text(low, high) for low, high in zip(curve[pair[0]], curve[pair[1]])]
            for c, pair in intervals.items()
        },
    )
    order = ["depth", *attacks, tables.CHANCE_ROW, "encoded_auc", "encoded_auc_95ci", "utility_runs"]
    st.dataframe(shown[[*order, "raw_auc", "raw_auc_95ci"]], hide_index=True)
    st.caption(
        "One row per number of private blocks (nc3 = 0, nc7 = 4, nc47 = 44). Attack columns: the best "
        "re-identification of each built-in attack as the organizers ran it, on single-site reid challenges "
        "of that depth. `encoded_auc`: mean AUC over findings and runs of the utility model on encodings of "
        "that depth (`utility_runs` runs of a depth sweep, one per seed); `raw_auc`: the same images as "
        "plaintext patches, the utility an encoding can at best keep; 0.5 is chance. `_95ci`: the 95% "
        "t-interval of the mean over runs (blank with one run); the chart draws it as error bars."
    )


def _transfer_against_depth(curve: pd.DataFrame, names: list[str]) -> None:
    st.subheader("Transfer against depth")
    if curve.empty:
        st.info(
            "No transfer challenge at a NeuraCrypt depth (nc3, nc7, nc47) has an organizer run yet: "
            "`ncbench demo` fills this section (nc3 and nc7). Or build one, "
            "`ncbench challenge build --preset nc7 --task transfer --n 100 --out nc7-transfer`, run a built-in "
            "attack on it, `ncbench attack run distribution-alignment --release nc7-transfer --out answer.h5`, and "
            "record its score: `ncbench score answer.h5 --key nc7-transfer --db DB --builtin`."
        )
        return
    attacks = [c for c in curve.columns if c not in ("depth", tables.CHANCE_ROW)]
    _attack_chart(curve, attacks, "best nearest-neighbour accuracy (public half)", names)
    # Text cells: a depth without a run of an attack reads "not run".
    st.dataframe(curve.assign(**{c: curve[c].map(percent) for c in [*attacks, tables.CHANCE_ROW]}), hide_index=True)
    st.caption(
        "One row per number of private blocks. A transfer challenge gives N encodings without their plaintexts, "
        "auxiliary plaintexts from the same distribution and T target plaintexts; for each target, the attack "
        "predicts its encoding under the release's secret key. Attack columns: the best nearest-neighbour accuracy "
        "of each built-in attack as the organizers ran it, on single-site transfer challenges of that depth: the "
        "fraction of predictions whose nearest true target encoding (compared as mean patch vectors) is the right "
        "one. Chance is 1 / T."
    )


def _attack_chart(curve: pd.DataFrame, attacks: list[str], title: str, names: list[str]) -> None:
    """One line per attack of a depth ``curve`` (fractions), and the chance level; coloured by
    their places in ``names``."""
    long = curve.melt(id_vars="depth", value_vars=[*attacks, tables.CHANCE_ROW], var_name="attack", value_name="value")
    y = alt.Y("value:Q", title=title, axis=alt.Axis(format="%"))
    _depth_chart(long.dropna(subset=["value"]), DEPTH_AXIS, y, "attack", names=names)


def _depth_chart(
    frame, x, y, series: str, *, interval: tuple[str, str] | None = None, names: list[str] | None = None
) -> None:
    """One line per ``series`` value of ``frame`` (long form) against depth, with error bars
    from the ``interval`` (low, high) columns where they are not NaN; nothing when empty. With
    ``names``, each value takes the colour of its place there, and the legend lists the values
    drawn."""
    if frame.empty:
        return
    tooltip = ["depth", series, y.shorthand.split(":")[0], *(interval or ())]
    colour = alt.Color(f"{series}:N", title=None)
    if names is not None:
        drawn = set(frame[series])
        legend = alt.Legend(values=[name for name in names if name in drawn])
        colour = alt.Color(f"{series}:N", title=None, scale=alt.Scale(domain=names), legend=legend)
    chart = alt.Chart(frame).mark_line(point=True).encode(x=x, y=y, color=colour, tooltip=tooltip)
    if interval is not None and frame[list(interval)].notna().all(axis=1).any():
        low, high = interval
        bars = (
            alt.Chart(frame.dropna(subset=[low, high]))
            .mark_errorbar(ticks=True)
            .encode(x=x, y=alt.Y(f"{low}:Q", title=y.to_dict().get("title")), y2=f"{high}:Q", color=colour)
        )
        chart = chart + bars
    st.altair_chart(chart, width="stretch")


@st.cache_data(ttl=REFRESH_S, show_spinner=False)
def live_challenges(server: str) -> list[dict] | None:
    """The server's open challenges (its public ``/api/v1/challenges``), or None when it does not
    answer: the board reads the API like any visitor, it never imports the server."""
    try:
        response = httpx.get(f"{reachable_server(server).rstrip('/')}/api/v1/challenges", timeout=3)
        response.raise_for_status()
        rows = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


def phase(blind: bool) -> str:
    """What an open challenge shows while it runs: public-half scores, or none (a blind one)."""
    return f"open, {tables.BLIND}" if blind else "open: public-half scores shown (Ladder)"


def open_challenge_table(store: Store, server: str | None) -> pd.DataFrame:
    """Open challenges with their limits: from the live server when it answers, else from the
    store (the default daily limit, no deadline known)."""
    columns = ["challenge_id", "task", "preset", "n_encoded", "daily_limit", "deadline", "phase"]
    rows = live_challenges(server) if server else None
    if rows is not None:
        return pd.DataFrame(
            [
                {
                    "challenge_id": str(row.get("challenge_id", "")),
                    "task": str(row.get("task", "")),
                    "preset": str(row.get("preset", "")),
                    "n_encoded": row.get("n_encoded"),
                    "daily_limit": f"{row['daily_limit']} a day" if row.get("daily_limit") else "none",
                    "deadline": tables.utc_minutes(row.get("deadline_utc")) or "none",
                    "phase": phase(bool(row.get("blind"))),
                }
                for row in rows
            ],
            columns=columns,
        )
    challenges = store.challenges()
    challenges = challenges[challenges["closed_utc"].isna()]
    return pd.DataFrame(
        {
            "challenge_id": challenges["challenge_id"],
            "task": challenges["task"],
            "preset": challenges["preset"],
            "n_encoded": challenges["n_encoded"],
            "daily_limit": f"{DEFAULT_DAILY_LIMIT} a day",
            "deadline": "set by the organizers",
            "phase": [phase(bool(blind)) for blind in challenges["blind"]],
        },
        columns=columns,
    )


def page_take_part(store: Store) -> None:
    st.header("Take part")
    server = os.environ.get(SERVER_ENV) or None
    live = open_challenge_table(store, server)
    # A server bound to every interface is named by the host this page was reached at.
    shown = shown_server(server, st.context.headers.get("Host"))
    if shown:
        st.markdown("Challenge server:")
        st.code(shown, language=None)
    if live.empty:
        st.info("No challenge is open right now. Closed challenges and their results are on the other pages.")
        challenge_id = "CHALLENGE_ID"
    else:
        st.subheader("Open challenges")
        st.dataframe(live, hide_index=True)
        st.caption(
            "daily_limit: scored submissions per team and UTC day (refused or failed ones do not count). "
            "Deadlines are UTC. When the organizers close a challenge its private-half scores appear."
        )
        if live["phase"].str.contains(tables.BLIND, regex=False).any():
            st.info(
                "A blind challenge shows no score while it runs: not yours, not anyone's, neither the public "
                "nor the private half, for answer files and verified runs alike. `ncbench submit` and "
                "`ncbench status` say *scored* and hold the number back; every score appears when the "
                "organizers close the challenge."
            )
        challenge_id = st.selectbox("Challenge for the commands below", live["challenge_id"].tolist())
    server_shown = shown or "https://SERVER"
    st.subheader("1. Install and log in")
    st.markdown(
        "Install the attacker's tools, then log in with the team token the organizers gave you. `login` "
        "reads the token without echoing it and keeps it in `~/.config/ncbench/config.json` (readable by "
        "you only); the environment variables `NCBENCH_SERVER` and `NCBENCH_TOKEN`, when set, take precedence."
    )
    st.code(
        f"""pip install -e .                        # from a checkout of ncbench
ncbench login --server {server_shown}   # paste the token when asked
ncbench whoami                          # your team, and submissions left today""",
        language="bash",
    )
    st.subheader("2. Fetch a release and attack it")
    st.code(
        f"""ncbench challenges                      # the open challenges, their limits and deadlines
ncbench fetch {challenge_id}              # public files into ./{challenge_id}, sha256 checked
ncbench challenge info {challenge_id}     # what the release holds
ncbench attack list -v                  # built-in attacks and their parameters
ncbench attack run gram-hungarian --release {challenge_id} --out submission.h5 --team YOUR-TEAM""",
        language="bash",
    )
    st.markdown(
        "Your own attack is a Python class (see `ncbench attack list -v` and the template in the "
        "documentation). `attack check` runs the checks the server runs, on a tiny release built on the fly:"
    )
    st.code(
        f"""ncbench attack check my_attack.py:MyAttack
ncbench attack run my_attack.py:MyAttack --release {challenge_id} --out submission.h5 --team YOUR-TEAM""",
        language="bash",
    )
    st.subheader("3. Submit and read your score")
    st.code(
        f"""ncbench submit submission.h5 --challenge {challenge_id}   # uploads, waits, prints the score
ncbench submissions                     # your submissions and their states
ncbench status SUBMISSION_ID --wait     # one submission, until it is scored""",
        language="bash",
    )
    st.markdown(
        "**The Ladder.** Each submission is scored on two halves of the encoded set. Only the public half "
        "is shown while the challenge is open, and it follows the Ladder (Blum & Hardt, 2015): a new public "
        "score is shown only when it beats your team's best shown score by 1/sqrt(public items), rounded "
        "to 1%, so the hidden key cannot be fitted through the board. The private half is exact and appears "
        "when the organizers close the challenge."
    )
    st.subheader("4. The verified track")
    st.markdown(
        "A score on a file is **self-reported**: it is listed as `your-team/your-attack`. To be "
        "**verified**, send the attack code itself: the organizers run it in a sandbox (no network) on "
        "fresh hidden releases, each with a new key whose seed was committed to beforehand."
    )
    st.code(f"ncbench submit --plugin my_attack.py:MyAttack --challenge {challenge_id}", language="bash")
    st.markdown(f"""**Rules**
- A submission is an HDF5 file (`format = "ncbench-submission"`) holding a `mapping` or a `scores` matrix
  (`reid`), `reconstructions` (`invert`) or target `encodings` (`transfer`), optionally `patch_positions`;
  a two-column CSV `encoded_id,plain_id` also works for `reid`.
- At most the daily limit above of scored submissions per team, challenge and UTC day ({DEFAULT_DAILY_LIMIT}
  unless the organizers set another); re-sending an identical file is recognised and not counted again.
- Submissions from attacks that read the secret key (the `oracle` baseline) are refused.
- Your file may not take a built-in attack's name. The attack x preset matrix holds only the organizers'
  own runs of the built-in attacks.
- Team names are folded to lowercase ASCII (`a-z 0-9 _ . -`): `Team`, `TEAM` and `ｔｅａｍ` are one team.""")
    with st.expander("Organizers: run a challenge"):
        st.code(
            """ncbench challenge build --preset nc7 --task reid --n 1000 --out my-challenge
ncbench challenge publish my-challenge --store store     # keep my-challenge/private/ secret
ncbench team add YOUR-TEAM --store store                 # prints the team's token once
ncbench server --store store                             # API, scoring workers and this board
ncbench leaderboard close CHALLENGE_ID --db store/leaderboard.db   # reveals the private half""",
            language="bash",
        )


def main() -> None:
    st.set_page_config(page_title="ncbench leaderboard", layout="wide")
    st.title("ncbench: is this NeuraCrypt encoding private?")
    db = database_argument()
    if not db:
        st.error(f"No database given: start with `ncbench leaderboard serve --db PATH|URL` (or set {DB_ENV}).")
        st.stop()
    try:
        store = open_store(database_url(db).render_as_string(hide_password=False))
    except NcbenchError as error:
        st.error(str(error))
        st.stop()
    titles = [title for title, _ in PAGES]
    slugs = dict(PAGES)
    if "page" not in st.session_state:  # a visitor's first load: the page the link names
        asked = st.query_params.get("page")
        st.session_state["page"] = next((title for title, slug in PAGES if slug == asked), titles[0])
    page = st.sidebar.radio("Page", titles, key="page")
    st.query_params["page"] = slugs[page]  # the address bar names the page: links and reloads land on it
    st.sidebar.caption(f"Refreshes every {REFRESH_S} s.")
    show = dict(
        zip(
            titles,
            (
                page_matrix,
                page_verified,
                page_self_reported,
                page_challenges,
                page_submission,
                page_privacy_utility,
                page_depth,
                page_take_part,
            ),
        )
    )[page]
    # A fragment re-runs on its own timer: new scores appear without the visitor reloading.
    st.fragment(run_every=REFRESH_S)(show)(store)


main()
