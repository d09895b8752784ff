"""The public tables built from stored results: the board, the attack x preset matrix (the
organizer's runs of the built-in attacks), the self-reported submissions and the privacy-utility
summary. Pure functions on pandas frames, shared by the app and ``export``.

Every string a team chose (its attack name, version) is data, never markup: :func:`to_csv` keeps
spreadsheets from reading a cell as a formula, :func:`to_markdown` escapes markup.
"""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np
import pandas as pd

from ncbench.leaderboard.metrics import CONFIDENCE, HEADLINE_METRIC, paired_interval, privacy_band, t_interval
from ncbench.leaderboard.store import ORIGIN_ORGANIZER, ORIGIN_SELF

INFO_COLUMNS = [
    "challenge_id",
    "task",
    "preset",
    "release",
    "split",
    "submission_id",
    "team",
    "attack",
    "attack_version",
    "origin",
    "created_utc",
    "runtime_s",
]
TEST_RELEASE = "test release (key public)"  # the `release` cell of a challenge built with a public seed
BLIND = "blind: scores hidden until the close"  # the `state` cell of a blind challenge still open
SELF_REPORTED_COLUMNS = [
    "challenge_id",
    "task",
    "preset",
    "release",
    "split",
    "team",
    "attack",
    "attack_version",
    "reidentification",
    "band",
    "chance",
    "created_utc",
    "submission_id",
]
# OWASP "CSV injection": a cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]()!|~])")  # < > & " ' become HTML entities first
HEADLINE_COLUMNS = ["n", "chance", "reidentification", "band", "k_anonymity"]
# Task-specific metrics, in the order a reader wants them; anything else stored follows.
DETAIL_COLUMNS = [
    "top1_accuracy",
    "top5_accuracy",
    "mrr",
    "tpr_at_0.1pct_fpr",
    "tpr_at_1pct_fpr",
    "one_to_one",
    "patch_position_accuracy",
    "psnr",
    "ssim",
]
CHANCE_ROW = "(chance level)"


def shown_attack(team: str, attack: str, origin: str) -> str:
    """How the board names an attack: a built-in's name for the organizer's runs, and
    'team/attack' for a self-reported file, in the team's own namespace."""
    return attack if origin == ORIGIN_ORGANIZER else f"{team}/{attack}"


def board(results: pd.DataFrame) -> pd.DataFrame:
    """One row per scored submission and visible split, headline first.

    results: :meth:`leaderboard.store.Store.results`. ``reidentification`` is the task's headline
    metric (reid accuracy, re-identification by nearest reconstruction, or transfer
    nearest-neighbour accuracy) and ``band`` its privacy band. ``attack`` is as
    :func:`shown_attack` names it; ``origin`` is 'organizer' or 'self-reported'; ``release`` is
    :data:`TEST_RELEASE` for a challenge whose key is public, else empty.
    """
    columns = INFO_COLUMNS + HEADLINE_COLUMNS + DETAIL_COLUMNS
    if results.empty:
        return pd.DataFrame(columns=columns)
    frame = results.copy()
    origin = frame["origin"] if "origin" in frame else pd.Series(ORIGIN_SELF, index=frame.index)
    frame["origin"] = origin
    frame["attack"] = [shown_attack(t, a, o) for t, a, o in zip(frame["team"], frame["attack"], origin)]
    test = frame["test_release"].astype(bool) if "test_release" in frame else pd.Series(False, index=frame.index)
    frame["release"] = np.where(test, TEST_RELEASE, "")
    if "n_sites" in frame:
        frame["preset"] = [site_preset(p, k) for p, k in zip(frame["preset"], frame["n_sites"])]
    frame = frame.drop(columns=["test_release", "n_sites"], errors="ignore")
    headline = pd.Series(np.nan, index=frame.index)
    for task, metric in HEADLINE_METRIC.items():
        if metric in frame:
            rows = frame["task"] == task
            headline[rows] = frame.loc[rows, metric]
    frame["reidentification"] = headline.astype(float)
    frame["band"] = frame["reidentification"].map(privacy_band)
    for column in columns:
        if column not in frame:
            frame[column] = np.nan
    skip = set(columns) | set(HEADLINE_METRIC.values())
    extra = sorted(c for c in frame.columns if c not in skip)
    ordered = frame[columns + extra]
    return ordered[[c for c in ordered.columns if c in INFO_COLUMNS + HEADLINE_COLUMNS or ordered[c].notna().any()]]


def filter_board(
    table: pd.DataFrame, *, team: str = "", attacks: list[str] | None = None, split: str | None = None
) -> pd.DataFrame:
    """Rows of :func:`board` whose team contains ``team`` (any case), whose attack is one of
    ``attacks`` (all when empty) and, when given, of one ``split``."""
    keep = pd.Series(True, index=table.index)
    if team.strip():
        keep &= table["team"].str.contains(team.strip(), case=False, regex=False)
    if attacks:
        keep &= table["attack"].isin(attacks)
    if split:
        keep &= table["split"] == split
    return table[keep]


def site_preset(preset: str, n_sites) -> str:
    """How the board names a challenge's preset: 'nc7', or 'nc7, 3 sites' for a release of three
    hospitals with independent keys (its own column: more keys, other attacks)."""
    n_sites = 1 if pd.isna(n_sites) else int(n_sites)
    return preset if n_sites == 1 else f"{preset}, {n_sites} sites"


def preset_order(challenges: pd.DataFrame) -> list[str]:
    """Presets from least to most mixing (linear, nc3-noshuffle, nc3, nc7, nc47), read from each
    challenge's recorded encoder configuration, each before its multi-site variants (named as
    :func:`site_preset` does); unknown configurations go last by name."""

    def strength(config_json: str, n_sites: int) -> tuple:
        try:
            config = json.loads(config_json)
            return (0, bool(config["mix"]), bool(config["shuffle"]), int(config["depth"]), n_sites)
        except (TypeError, ValueError, KeyError):
            return (1,)

    keys: dict[str, tuple] = {}
    sites = challenges["n_sites"] if "n_sites" in challenges else pd.Series(1, index=challenges.index)
    for preset, config_json, n_sites in zip(challenges["preset"], challenges["encoder_config"], sites):
        keys.setdefault(site_preset(preset, n_sites), strength(config_json, int(n_sites)))
    return sorted(keys, key=lambda p: (keys[p], p))


def attack_preset_matrix(
    table: pd.DataFrame, *, task: str | None = None, split: str = "public", presets: list[str] | None = None
) -> pd.DataFrame:
    """Best re-identification (fraction) of each built-in attack (rows) on each preset (columns),
    from the organizer's own runs only: no file's claim about itself reaches this table.

    table: :func:`board`. A last row, :data:`CHANCE_ROW`, gives each preset's chance level (the
    largest one when a preset has challenges of several sizes). Columns follow ``presets`` when
    given. Empty when nothing matches.
    """
    rows = _organizer(table)
    rows = rows[rows["split"] == split]
    if task is not None:
        rows = rows[rows["task"] == task]
    rows = rows.dropna(subset=["reidentification"])
    if rows.empty:
        return pd.DataFrame()
    best = rows.pivot_table(index="attack", columns="preset", values="reidentification", aggfunc="max")
    chance = rows.groupby("preset")["chance"].max().rename(CHANCE_ROW)
    matrix = pd.concat([best, chance.to_frame().T])
    if presets is not None:
        matrix = matrix[[p for p in presets if p in matrix.columns] + [p for p in matrix.columns if p not in presets]]
    matrix.index.name, matrix.columns.name = "attack", None
    return matrix


def matrix_provenance(table: pd.DataFrame, *, task: str | None = None, split: str = "public") -> pd.DataFrame:
    """For each (attack, preset) cell of :func:`attack_preset_matrix`: how many organizer
    submissions stand behind it and when the latest was scored (UTC)."""
    rows = _organizer(table)
    rows = rows[rows["split"] == split]
    if task is not None:
        rows = rows[rows["task"] == task]
    if rows.empty:
        return pd.DataFrame(columns=["attack", "preset", "submissions", "last_scored_utc"])
    grouped = rows.groupby(["attack", "preset"], sort=True)
    return pd.DataFrame(
        {"submissions": grouped["submission_id"].nunique(), "last_scored_utc": grouped["created_utc"].max()}
    ).reset_index()


def self_reported(table: pd.DataFrame, *, task: str | None = None, split: str | None = None) -> pd.DataFrame:
    """The self-reported rows of :func:`board` (teams' files: attack name, parameters and
    declared knowledge unverified), best re-identification first; columns
    :data:`SELF_REPORTED_COLUMNS`."""
    origin = table["origin"] if "origin" in table else pd.Series(ORIGIN_SELF, index=table.index)
    rows = table[origin == ORIGIN_SELF]
    if task is not None:
        rows = rows[rows["task"] == task]
    if split is not None:
        rows = rows[rows["split"] == split]
    rows = rows.sort_values(["reidentification", "submission_id"], ascending=[False, True], kind="stable")
    return rows.reindex(columns=SELF_REPORTED_COLUMNS).reset_index(drop=True)


def _organizer(table: pd.DataFrame) -> pd.DataFrame:
    if "origin" not in table:
        return table.iloc[0:0]
    return table[table["origin"] == ORIGIN_ORGANIZER]


def privacy_utility(table: pd.DataFrame, utility: pd.DataFrame) -> pd.DataFrame:
    """Per preset: the best re-identification of any built-in attack the organizer ran (public
    half) beside the utility.

    Columns: preset, best_reidentification, band, encoded_auc (mean AUC over labels of the latest
    run on the preset's encodings), raw_auc (the same for the latest run on plaintexts, the
    reference; shared by every preset). Only the latest single-site run counts, so results
    recorded before a change of settings or model do not blur the new ones, and runs across several
    sites (:func:`multi_site_summary`) are not mixed in. Presets with utility results but no attack
    yet have a NaN re-identification.
    """
    columns = ["preset", "best_reidentification", "band", "encoded_auc", "raw_auc"]
    utility = latest_utility(utility)
    if utility.empty:
        return pd.DataFrame(columns=columns)
    encoded = utility[utility["model_kind"] == "encoded"].groupby("preset")["auc"].mean()
    raw_runs = utility[utility["model_kind"] == "raw"]
    raw = raw_runs[raw_runs["created_utc"] == raw_runs["created_utc"].max()]["auc"]
    table = _organizer(table)
    public = table[table["split"] == "public"] if not table.empty else table
    best = public.groupby("preset")["reidentification"].max() if not public.empty else pd.Series(dtype=float)
    presets = sorted(set(encoded.index))
    frame = pd.DataFrame(
        {
            "preset": presets,
            "best_reidentification": [float(best.get(p, math.nan)) for p in presets],
            "encoded_auc": [float(encoded[p]) for p in presets],
        }
    )
    frame["band"] = frame["best_reidentification"].map(privacy_band)
    frame["raw_auc"] = float(raw.mean()) if len(raw) else math.nan
    return frame[columns]


def latest_utility(utility: pd.DataFrame) -> pd.DataFrame:
    """The rows of the latest single-site utility run (:func:`single_site_utility`) for each
    (model kind, preset)."""
    utility = single_site_utility(utility)
    latest = utility.groupby(["model_kind", "preset"])["created_utc"].transform("max")
    return utility[utility["created_utc"] == latest]


def utility_by_label(utility: pd.DataFrame) -> pd.DataFrame:
    """AUC per finding (rows) and preset (columns) of the latest run each; the raw reference last."""
    latest = latest_utility(utility)
    if latest.empty:
        return pd.DataFrame()
    model = latest["preset"].where(latest["model_kind"] == "encoded", "raw")
    table = latest.assign(model=model).pivot_table(index="label", columns="model", values="auc", aggfunc="mean")
    return table[[m for m in table.columns if m != "raw"] + [m for m in table.columns if m == "raw"]]


# -- privacy and utility against depth (benchmarks/depth.py) ---------------------------------------

# Settings a depth-sweep run shares with the raw reference trained on the same images.
DEPTH_RUN_SETTINGS = ("seed", "n_train", "n_test", "image_size", "patch_size", "epochs", "source")


def _shuffling_depth(config_json) -> float:
    """The depth (private blocks) of a recorded encoder configuration of the NeuraCrypt family
    (positional mixing and shuffles: nc3, nc7, nc47 and their depth overrides); NaN for any
    other encoder (linear and nc3-noshuffle have depth 0 too, but are other encoders)."""
    try:
        config = json.loads(config_json)
        return float(config["depth"]) if config["mix"] and config["shuffle"] else math.nan
    except (TypeError, ValueError, KeyError):
        return math.nan


def depth_curve(table: pd.DataFrame, challenges: pd.DataFrame, utility: pd.DataFrame) -> pd.DataFrame:
    """Privacy and utility against the encoder's number of private blocks.

    table: :func:`board`; challenges: :meth:`Store.challenges`; utility: :meth:`Store.utility`.
    One row per depth (ascending). Columns: ``depth``; one column per built-in attack, its best
    re-identification (fraction, public half, the organizer's own runs) on single-site ``reid``
    challenges whose recorded encoder configuration has that depth (:func:`_shuffling_depth`);
    :data:`CHANCE_ROW` (the chance level, the largest of those challenges'; apart from the
    built-in attack named ``chance``); ``encoded_auc``: mean AUC over labels and runs
    of the single-site utility runs whose settings carry this ``depth`` (a depth sweep), with
    ``utility_runs`` their number; ``raw_auc``: the mean AUC of the raw references trained on the
    same images and settings (:data:`DEPTH_RUN_SETTINGS`) as any of those runs, latest raw model
    version only, the same in every row. ``encoded_auc_low`` / ``_high`` and ``raw_auc_low`` /
    ``_high``: 95% t-intervals over runs (seeds), each run's mean over labels one sample
    (:func:`metrics.t_interval`; NaN with one run). NaN where a side has nothing. Empty (columns
    depth, :data:`CHANCE_ROW`, encoded_auc, utility_runs, raw_auc and the interval columns) when
    neither side has anything.
    """
    intervals = ["encoded_auc_low", "encoded_auc_high", "raw_auc_low", "raw_auc_high"]
    base = ["depth", CHANCE_ROW, "encoded_auc", "utility_runs", "raw_auc", *intervals]
    privacy = _best_per_depth(table, challenges, task="reid")

    runs = single_site_utility(utility)
    swept = pd.DataFrame(columns=["depth", "auc", "run"])
    raw_auc = raw_low = raw_high = math.nan
    if not runs.empty:
        settings = runs["settings"]
        depth = settings.map(lambda s: s.get("depth") if isinstance(s, dict) else None)
        encoded = runs[(runs["model_kind"] == "encoded") & depth.notna()]
        swept = encoded.assign(
            depth=depth[encoded.index].astype(float),
            run=[
                f"{c}|{p}|{s.get('seed')}"
                for c, p, s in zip(encoded["created_utc"], encoded["preset"], encoded["settings"])
            ],
        )

        def same_images(s) -> tuple:
            return tuple(s.get(k) for k in DEPTH_RUN_SETTINGS)

        keys = {same_images(s) for s in swept["settings"]}
        raw = runs[(runs["model_kind"] == "raw") & settings.map(same_images).isin(keys)]
        if not raw.empty:
            version = raw["settings"].map(lambda s: s.get("model_version", 0))
            raw = raw[version == version.max()]
            # One sample per raw run: a run is its time, settings and seed (one call may record several seeds).
            run = raw["created_utc"] + "|" + raw["settings"].map(lambda s: f"{_setting(s)}|{s.get('seed')}")
            raw_auc, raw_low, raw_high = t_interval(raw.groupby(run)["auc"].mean())
    if privacy.empty and swept.empty:
        return pd.DataFrame(columns=base)
    # Each run's mean over labels is one sample; the interval is over runs (seeds) at that depth.
    per_run = swept.groupby(["depth", "run"])["auc"].mean()
    utility_by_depth = pd.DataFrame(
        [
            dict(zip(("encoded_auc", "encoded_auc_low", "encoded_auc_high"), t_interval(runs)), utility_runs=len(runs))
            for _, runs in per_run.groupby(level="depth")
        ],
        index=per_run.index.get_level_values("depth").unique(),
        columns=["encoded_auc", "encoded_auc_low", "encoded_auc_high", "utility_runs"],
    )
    depths = sorted(set(privacy.index) | set(utility_by_depth.index))
    frame = privacy.reindex(depths).rename_axis(index="depth").join(utility_by_depth.reindex(depths))
    frame["utility_runs"] = frame["utility_runs"].fillna(0).astype(int)
    frame["raw_auc"], frame["raw_auc_low"], frame["raw_auc_high"] = raw_auc, raw_low, raw_high
    frame = frame.reset_index()
    frame["depth"] = frame["depth"].astype(int)
    attacks = [c for c in privacy.columns if c != CHANCE_ROW]
    return frame[["depth", *attacks, CHANCE_ROW, "encoded_auc", "utility_runs", "raw_auc", *intervals]]


def transfer_depth_curve(table: pd.DataFrame, challenges: pd.DataFrame) -> pd.DataFrame:
    """The transfer challenge against the encoder's number of private blocks.

    table: :func:`board`; challenges: :meth:`Store.challenges`. One row per depth (ascending).
    Columns: ``depth``; one column per built-in attack, its best nearest-neighbour accuracy
    (``nn_accuracy``, fraction, public half, the organizer's own runs) on single-site
    ``transfer`` challenges whose recorded encoder configuration has that depth
    (:func:`_shuffling_depth`); :data:`CHANCE_ROW` (the chance level 1 / targets, the largest of
    those challenges'). Empty (columns depth and :data:`CHANCE_ROW`) when no such challenge has a
    result.
    """
    best = _best_per_depth(table, challenges, task="transfer")
    if best.empty:
        return pd.DataFrame(columns=["depth", CHANCE_ROW])
    frame = best.reset_index()
    frame["depth"] = frame["depth"].astype(int)
    return frame


def _best_per_depth(table: pd.DataFrame, challenges: pd.DataFrame, *, task: str) -> pd.DataFrame:
    """The privacy side of the depth curves: index ``depth`` (float, ascending), one column per
    built-in attack with its best headline metric (public half, the organizer's own runs) on the
    single-site ``task`` challenges of that depth (:func:`_shuffling_depth`), and
    :data:`CHANCE_ROW`, the largest of their chance levels. No rows when nothing matches."""
    rows = _organizer(table)
    if not rows.empty:
        rows = rows[(rows["split"] == "public") & (rows["task"] == task)].dropna(subset=["reidentification"])
    if not rows.empty and not challenges.empty:
        sites = challenges["n_sites"].fillna(1) if "n_sites" in challenges else pd.Series(1, index=challenges.index)
        single = challenges[sites.astype(int) == 1]
        depth_of = dict(zip(single["challenge_id"], single["encoder_config"].map(_shuffling_depth)))
        rows = rows.assign(depth=rows["challenge_id"].map(depth_of)).dropna(subset=["depth"])
    else:
        rows = pd.DataFrame(columns=["depth", "attack", "reidentification", "chance"])
    best = rows.pivot_table(index="depth", columns="attack", values="reidentification", aggfunc="max")
    best[CHANCE_ROW] = rows.groupby("depth")["chance"].max()
    return best.rename_axis(index="depth", columns=None)


# -- utility across several sites (baselines/utility.py, ``--sites K``) ---------------------------

# How each model of a multi-site run was trained (settings "training"), in the order a reader compares them:
# each site alone, the union of the sites under their own keys, the union under one key, raw patches.
SITE_TRAININGS = ("site", "union", "one-key", "raw")


def _sites_of(settings) -> int:
    """The ``sites`` of a utility row's settings; 1 for a single-site run (no such key)."""
    try:
        return int(settings.get("sites", 1))
    except (AttributeError, TypeError, ValueError):
        return 1


def single_site_utility(utility: pd.DataFrame) -> pd.DataFrame:
    """The utility rows of single-site runs: settings without ``sites``, or with 1."""
    if utility.empty:
        return utility
    return utility[utility["settings"].map(_sites_of) == 1]


def multi_site_utility(utility: pd.DataFrame) -> pd.DataFrame:
    """The utility rows of runs across several sites, with their settings' ``sites``,
    ``training`` (one of :data:`SITE_TRAININGS`) and ``eval_site`` (0-based) as columns."""
    if utility.empty:
        return utility.assign(sites=[], training=[], eval_site=[])
    rows = utility[utility["settings"].map(_sites_of) > 1]
    return rows.assign(
        sites=rows["settings"].map(_sites_of),
        training=rows["settings"].map(lambda s: s.get("training")),
        eval_site=rows["settings"].map(lambda s: s.get("eval_site")),
    )


def latest_multi_site(utility: pd.DataFrame) -> pd.DataFrame:
    """For each preset, the rows of its latest multi-site run (:func:`multi_site_utility`) and the
    raw reference recorded with it (same created_utc)."""
    rows = multi_site_utility(utility)
    encoded = rows[rows["model_kind"] == "encoded"]
    encoded = encoded[encoded["created_utc"] == encoded.groupby("preset")["created_utc"].transform("max")]
    raw = rows[(rows["model_kind"] == "raw") & rows["created_utc"].isin(set(encoded["created_utc"]))]
    return pd.concat([encoded, raw])


def multi_site_table(utility: pd.DataFrame, *, by: str = "eval_site") -> pd.DataFrame:
    """Mean AUC of each model of a multi-site run (columns :data:`SITE_TRAININGS`; NaN where the
    run lacks one) per preset and ``by``: ``eval_site`` (mean over labels of the AUCs on one
    site's held-out images; site k's own model in column ``site``) or ``label`` (mean over
    sites). A last row per preset, ``mean``, averages every site and label.

    utility: one run per preset (:func:`latest_multi_site`, or the rows
    ``baselines.utility.run_utility`` returns); a raw reference counts for the presets recorded
    with it (same created_utc, when there is such a column). Columns: preset, ``by`` (as text),
    then :data:`SITE_TRAININGS`.
    """
    columns = ["preset", by, *SITE_TRAININGS]
    rows = multi_site_utility(utility)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    run = rows["created_utc"] if "created_utc" in rows else pd.Series("", index=rows.index)
    rows = rows.assign(run=run, key=rows[by].astype(str))
    raw = rows[rows["model_kind"] == "raw"]
    parts = []
    for preset, own in rows[rows["model_kind"] == "encoded"].groupby("preset", sort=False):
        own = pd.concat([own, raw[raw["run"].isin(set(own["run"]))]])
        table = own.pivot_table(index="key", columns="training", values="auc", aggfunc="mean", sort=False)
        table.loc["mean"] = own.groupby("training")["auc"].mean()
        table = table.reindex(columns=list(SITE_TRAININGS)).rename_axis(index=by, columns=None)
        parts.append(table.reset_index().assign(preset=preset))
    return pd.concat(parts, ignore_index=True)[columns]


def multi_site_summary(utility: pd.DataFrame) -> pd.DataFrame:
    """Per preset, its latest multi-site run: mean AUC over sites and labels of the per-site models
    (``per_site_auc``), of the one model on the union of the sites' encodings, each under its own
    key (``union_auc``), of the union under one key (``one_key_auc``) and of raw patches
    (``raw_auc``); ``union_gain`` = union - per-site (does collaboration help: the paper's claim)
    and ``key_cost`` = one-key - union (what independent keys cost)."""
    columns = [
        "preset",
        "sites",
        "per_site_auc",
        "union_auc",
        "one_key_auc",
        "raw_auc",
        "union_gain",
        "key_cost",
        "created_utc",
    ]
    latest = latest_multi_site(utility)
    table = multi_site_table(latest)
    if table.empty:
        return pd.DataFrame(columns=columns)
    means = table[table["eval_site"] == "mean"].set_index("preset")
    encoded = latest[latest["model_kind"] == "encoded"].groupby("preset")
    frame = pd.DataFrame(
        {
            "sites": encoded["sites"].max(),
            "per_site_auc": means["site"],
            "union_auc": means["union"],
            "one_key_auc": means["one-key"],
            "raw_auc": means["raw"],
            "created_utc": encoded["created_utc"].max(),
        }
    )
    frame["union_gain"] = frame["union_auc"] - frame["per_site_auc"]
    frame["key_cost"] = frame["one_key_auc"] - frame["union_auc"]
    return frame.rename_axis("preset").reset_index()[columns]


# -- utility over seeds: means with confidence intervals, and paired differences --------------------

# Settings that do not define a utility setting: a row differing from another only in these is the same
# setting measured again (another seed; another machine, thread count or resolved precision, which move
# AUCs by arithmetic order only, about 0.02) or another site's score of the same model.
NOT_A_SETTING = ("seed", "threads", "device", "precision", "eval_site")


def _setting(settings, leave_out: tuple[str, ...] = ()) -> str:
    """The canonical JSON of a row's settings without :data:`NOT_A_SETTING` and ``leave_out``."""
    if not isinstance(settings, dict):
        return "{}"
    kept = {k: v for k, v in settings.items() if k not in NOT_A_SETTING and k not in leave_out}
    return json.dumps(kept, sort_keys=True, default=str)


def seed_means(utility: pd.DataFrame, *, split_by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (model, setting, seed): ``auc`` is the mean over labels (and, in a run across
    several sites, over the sites each model was scored on) of one seed's run; ``setting`` the
    canonical JSON of its settings without :data:`NOT_A_SETTING`. Each settings key in
    ``split_by`` (e.g. ``training``) becomes a column of its own and leaves the setting, so the
    models of one run share a setting. A seed recorded more than once for a setting keeps its
    latest run, so a rerun replaces a seed instead of counting twice. Columns
    :data:`SEED_MEAN_COLUMNS`, with ``split_by`` after ``model_kind``."""
    keys = ["preset", "model_kind", *split_by, "setting", "seed"]
    if utility.empty:
        return pd.DataFrame(columns=[*keys, "auc", "created_utc"])
    settings = utility["settings"]
    rows = utility.assign(
        **{key: settings.map(lambda s, key=key: s.get(key)) for key in split_by},
        setting=settings.map(lambda s: _setting(s, split_by)),
        seed=settings.map(lambda s: s.get("seed") if isinstance(s, dict) else None),
    ).dropna(subset=["seed"])
    rows = rows[rows["created_utc"] == rows.groupby(keys)["created_utc"].transform("max")]
    means = rows.groupby([*keys, "created_utc"], as_index=False)["auc"].mean()
    return means[[*keys, "auc", "created_utc"]].reset_index(drop=True)


def interval_text(low: float, high: float, *, signed: bool = False) -> str:
    """``[low, high]`` to three decimals (with signs for differences); empty when NaN (one seed)."""
    if pd.isna(low) or pd.isna(high):
        return ""
    form = "+.3f" if signed else ".3f"
    return f"[{low:{form}}, {high:{form}}]"


def _interval_columns(prefix: str, values, confidence: float) -> dict[str, float]:
    mean, low, high = t_interval(values, confidence=confidence)
    return {prefix: mean, f"{prefix}_low": low, f"{prefix}_high": high}


def _paired_columns(prefix: str, treated: pd.Series, reference: pd.Series, confidence: float) -> dict:
    """Interval of ``treated - reference`` over the seeds (index) both have; ``{prefix}_seeds`` counts them."""
    both = treated.index.intersection(reference.index)
    mean, low, high = paired_interval(treated[both].to_numpy(), reference[both].to_numpy(), confidence=confidence)
    return {prefix: mean, f"{prefix}_low": low, f"{prefix}_high": high, f"{prefix}_seeds": len(both)}


UTILITY_INTERVAL_COLUMNS = [
    "preset",
    "model_kind",
    "depth",
    "n_train",
    "n_test",
    "width",
    "epochs",
    "seeds",
    "auc",
    "auc_low",
    "auc_high",
    "vs_raw",
    "vs_raw_low",
    "vs_raw_high",
    "vs_raw_seeds",
    "seed_list",
]


def utility_intervals(utility: pd.DataFrame, *, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Single-site utility over seeds: one row per (preset, model kind, setting).

    ``auc`` is the mean over ``seeds`` seeds of each seed's mean AUC over labels
    (:func:`seed_means`), ``auc_low`` / ``auc_high`` its t-interval at ``confidence``
    (:func:`metrics.t_interval`; NaN with one seed). For a model on encodings, ``vs_raw`` is the
    mean paired difference encoded - raw over the ``vs_raw_seeds`` seeds where the raw reference
    was trained on the same images (:data:`DEPTH_RUN_SETTINGS`, latest raw model version), with
    its interval ``vs_raw_low`` / ``vs_raw_high`` (:func:`metrics.paired_interval`): an interval
    below 0 means the encoding costs utility beyond the seed-to-seed noise. ``seed_list``: the
    seeds, comma-separated. Empty frame with :data:`UTILITY_INTERVAL_COLUMNS` when nothing is recorded.
    """
    means = seed_means(single_site_utility(utility))
    if means.empty:
        return pd.DataFrame(columns=UTILITY_INTERVAL_COLUMNS)
    settings = means["setting"].map(json.loads)
    means = means.assign(images=[tuple(s.get(k) for k in DEPTH_RUN_SETTINGS[1:]) for s in settings])
    raw = means[means["model_kind"] == "raw"]
    if not raw.empty:  # the latest raw model version of each image set
        version = raw["setting"].map(lambda s: json.loads(s).get("model_version", 0))
        raw = raw[version == version.groupby(raw["images"]).transform("max")]
    rows = []
    for (preset, kind, setting), own in means.groupby(["preset", "model_kind", "setting"], sort=False):
        settings = json.loads(setting)
        by_seed = own.set_index("seed")["auc"]
        row = {
            "preset": preset,
            "model_kind": kind,
            **{k: settings.get(k) for k in ("depth", "n_train", "n_test", "width", "epochs")},
            "seeds": len(by_seed),
            **_interval_columns("auc", by_seed.to_numpy(), confidence),
            "seed_list": ",".join(str(int(seed)) for seed in sorted(by_seed.index)),
        }
        if kind == "encoded":
            reference = raw[raw["images"] == own["images"].iloc[0]].groupby("seed")["auc"].mean()
            row.update(_paired_columns("vs_raw", by_seed, reference, confidence))
        rows.append(row)
    frame = pd.DataFrame(rows).reindex(columns=UTILITY_INTERVAL_COLUMNS)
    frame["vs_raw_seeds"] = frame["vs_raw_seeds"].fillna(0).astype(int)
    return frame


MULTI_SITE_INTERVAL_COLUMNS = [
    "preset",
    "sites",
    "images_per_site",
    "n_test",
    "width",
    "epochs",
    "seeds",
    "site",
    "site_low",
    "site_high",
    "union",
    "union_low",
    "union_high",
    "one-key",
    "union_gain",
    "union_gain_low",
    "union_gain_high",
    "union_gain_seeds",
    "key_cost",
    "key_cost_low",
    "key_cost_high",
    "key_cost_seeds",
    "seed_list",
]


def multi_site_intervals(utility: pd.DataFrame, *, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Runs across several sites over seeds: one row per (preset, number of sites, setting).

    Each seed's run gives each training (:data:`SITE_TRAININGS`) one mean AUC over labels and
    evaluated sites (the per-site models each on its own site). ``site`` / ``union`` (with
    t-intervals at ``confidence``) and ``one-key`` are means over ``seeds`` seeds of those;
    ``union_gain`` is the paired difference union - site (the paper's claim that hospitals
    with independent keys train better together: significant where the interval excludes 0)
    and ``key_cost`` one-key - union, each with its interval and the seeds paired
    (0 when the run trained no such model). ``images_per_site``: training images of each site.
    """
    rows = multi_site_utility(utility)
    encoded = rows[rows["model_kind"] == "encoded"] if not rows.empty else rows
    if encoded.empty:
        return pd.DataFrame(columns=MULTI_SITE_INTERVAL_COLUMNS)
    means = seed_means(encoded, split_by=("training",))
    out = []
    for (preset, setting), own in means.groupby(["preset", "setting"], sort=False):
        settings = json.loads(setting)
        by_training = {t: part.set_index("seed")["auc"] for t, part in own.groupby("training")}
        empty = pd.Series(dtype=float)
        site, union, one_key = (by_training.get(t, empty) for t in ("site", "union", "one-key"))
        seeds = sorted(set(own["seed"]))
        out.append(
            {
                "preset": preset,
                "sites": settings.get("sites"),
                "images_per_site": settings.get("n_train", 0) // max(1, settings.get("sites", 1)),
                **{k: settings.get(k) for k in ("n_test", "width", "epochs")},
                "seeds": len(seeds),
                **_interval_columns("site", site.to_numpy(), confidence),
                **_interval_columns("union", union.to_numpy(), confidence),
                "one-key": float(one_key.mean()) if len(one_key) else math.nan,
                **_paired_columns("union_gain", union, site, confidence),
                **_paired_columns("key_cost", one_key, union, confidence),
                "seed_list": ",".join(str(int(seed)) for seed in seeds),
            }
        )
    frame = pd.DataFrame(out).reindex(columns=MULTI_SITE_INTERVAL_COLUMNS)
    return frame.sort_values(["preset", "sites", "images_per_site"], kind="stable").reset_index(drop=True)


# -- the verified track (leaderboard/verified/runs.py) -----------------------------------------------

VERIFIED_SUMMARY_COLUMNS = [
    "challenge_id",
    "task",
    "preset",
    "precision",
    "n",
    "run_id",
    "attack",
    "origin",
    "sandboxed",
    "state",
    "scores_hidden",
    "releases",
    "scored",
    "mean",
    "spread",
    "min",
    "max",
    "wall_s",
    "cpu_s",
    "peak_memory_mb",
    "message",
    "created_utc",
]
UNSANDBOXED = "UNSANDBOXED"  # the mark of a run the organizer made without the sandbox (local testing)
HIDDEN_SEED = "hidden until the challenge closes"


def verified_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per verified run: mean and spread of re-identification over its K evaluation
    releases (each with a fresh key), and what each release cost.

    results: :func:`leaderboard.verified.runs.results` (one row per run and evaluation release).
    ``spread`` is the sample standard deviation over the scored releases (NaN for fewer than
    two); ``wall_s`` and ``cpu_s`` are per release (means); ``peak_memory_mb`` the largest.
    ``scored`` (releases scored) is missing, like the scores, while ``scores_hidden`` (a blind
    challenge still open): a count of 0 would read as data.
    """
    if results.empty:
        return pd.DataFrame(columns=VERIFIED_SUMMARY_COLUMNS)
    if "scores_hidden" not in results:  # a table without the column hides nothing
        results = results.assign(scores_hidden=False)
    scored = results[results["release_state"] == "scored"]
    by_run = scored.groupby("run_id")["reidentification"]
    first = results.drop_duplicates("run_id").set_index("run_id")[
        [
            "challenge_id",
            "task",
            "preset",
            "precision",
            "n",
            "attack",
            "origin",
            "sandboxed",
            "state",
            "scores_hidden",
            "releases",
            "message",
            "created_utc",
        ]
    ]
    frame = pd.DataFrame(
        {
            "scored": by_run.count(),
            "mean": by_run.mean(),
            "spread": by_run.std(ddof=1),
            "min": by_run.min(),
            "max": by_run.max(),
            "wall_s": results.groupby("run_id")["wall_s"].mean(),
            "cpu_s": results.groupby("run_id")["cpu_s"].mean(),
            "peak_memory_mb": results.groupby("run_id")["peak_rss_bytes"].max() / (1 << 20),
        },
        index=first.index,
    )
    frame["scored"] = frame["scored"].fillna(0).astype("Int64")
    frame = first.join(frame).reset_index()
    frame["scores_hidden"] = frame["scores_hidden"].astype(bool)
    frame.loc[frame["scores_hidden"], "scored"] = pd.NA
    return frame.reindex(columns=VERIFIED_SUMMARY_COLUMNS).sort_values("run_id", kind="stable").reset_index(drop=True)


def verified_matrix(
    summary: pd.DataFrame, *, task: str | None = None, presets: list[str] | None = None
) -> pd.DataFrame:
    """The verified matrix: for each attack (rows) and preset and size (columns, 'nc7, N=100':
    runs on releases of different sizes have different chance levels, so they are not merged),
    the scored run with the best mean, as text 'mean ± spread (K=k)' in percent; a run made
    without the sandbox is marked :data:`UNSANDBOXED`. Built-ins are named as they are, teams'
    plugins team/attack.

    summary: :func:`verified_summary`. Empty when no run is scored.
    """
    rows = summary[(summary["state"] == "scored") & summary["mean"].notna()]
    if task is not None:
        rows = rows[rows["task"] == task]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(preset=[sized_preset(p, n) for p, n in zip(rows["preset"], rows["n"])])
    if presets is not None:
        order = {preset: i for i, preset in enumerate(presets)}
        sized = sorted(set(zip(summary["preset"], summary["n"])), key=lambda pn: (order.get(pn[0], len(order)), pn))
        presets = [sized_preset(p, n) for p, n in sized]
    best = rows.sort_values(["mean", "run_id"], ascending=[False, True], kind="stable").drop_duplicates(
        ["attack", "preset"]
    )

    def cell(row) -> str:
        spread = "" if pd.isna(row.spread) else f" ± {100 * row.spread:.1f}%"
        mark = "" if row.sandboxed else f" {UNSANDBOXED}"
        # bf16 releases are an organizer's explicit choice: their encodings are not fp32's.
        arithmetic = "" if getattr(row, "precision", "fp32") == "fp32" else f" [{row.precision}]"
        return f"{100 * row.mean:.1f}%{spread} (K={row.scored}){arithmetic}{mark}"

    best = best.assign(cell=[cell(row) for row in best.itertuples()])
    matrix = best.pivot(index="attack", columns="preset", values="cell")
    if presets is not None:
        matrix = matrix[[p for p in presets if p in matrix.columns] + [p for p in matrix.columns if p not in presets]]
    matrix.index.name, matrix.columns.name = "attack", None
    return matrix.fillna("not run")


EXPORT_TRACKS = ("answer file", "verified")  # the `track` of each exported row


def export_table(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """What ``leaderboard export`` writes: every public result, answer files and verified runs.

    table: :func:`board` (one row per scored submission and visible half: track 'answer file');
    summary: :func:`verified_summary` (one row per verified run: track 'verified', with its
    ``run_id``, ``state``, ``sandboxed``, ``releases`` K and ``scored``; ``reidentification`` is
    the mean over its K fresh releases and ``spread`` their sample standard deviation; a run of a
    blind challenge still open has none of ``scored``, ``reidentification`` and ``spread``, and
    its ``band`` says :data:`BLIND`; no
    ``split``, since each evaluation release is scored whole). Ids and counts are integers with
    missing values (pandas ``Int64``), so a CSV reads 7, not 7.0.
    """
    files = table.assign(track=EXPORT_TRACKS[0])
    runs = pd.DataFrame(
        {
            "track": EXPORT_TRACKS[1],
            "challenge_id": summary["challenge_id"],
            "task": summary["task"],
            "preset": summary["preset"],
            "run_id": summary["run_id"],
            "attack": summary["attack"],
            "origin": summary["origin"],
            "created_utc": summary["created_utc"],
            "state": summary["state"],
            "sandboxed": summary["sandboxed"].astype(bool),
            "n": summary["n"],
            "releases": summary["releases"],
            "scored": summary["scored"],
            "reidentification": summary["mean"].astype(float),
            # A blind challenge still open: its verified scores (and how many there are) say hidden.
            "band": [
                BLIND if hidden else privacy_band(mean)
                for hidden, mean in zip(summary["scores_hidden"], summary["mean"].astype(float), strict=True)
            ],
            "spread": summary["spread"].astype(float),
        }
    )
    parts = [part for part in (files, runs) if not part.empty]
    columns = [*files.columns, *(c for c in runs.columns if c not in files.columns)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    for column in ("submission_id", "run_id", "releases", "scored"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    return frame[["track", *(c for c in frame.columns if c != "track")]]


def sized_preset(preset: str, n) -> str:
    """A preset with the size of its releases: 'nc7, N=100' ('nc7' when the size is unknown)."""
    return preset if pd.isna(n) else f"{preset}, N={int(n)}"


def verified_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """The verified runs as a reader wants them: one text ``result`` per run ('42.0% ± 1.5% over
    K=3 keys', or the state and its reason for a run that did not score), the size of the
    releases beside the preset, costs rounded, times in UTC minutes; nothing empty shows as a
    missing value.

    summary: :func:`verified_summary`."""
    columns = ["run_id", "attack", "preset", "state", "result", "wall_s", "cpu_s", "peak_memory_mb", "created"]
    if summary.empty:
        return pd.DataFrame(columns=columns)

    def result(row) -> str:
        if row.state == "scored" and not pd.isna(row.mean):
            spread = "" if pd.isna(row.spread) else f" ± {100 * row.spread:.1f}%"
            mark = "" if row.sandboxed else f" {UNSANDBOXED}"
            return f"{100 * row.mean:.1f}%{spread} over K={row.scored} keys{mark}"
        if row.scores_hidden and row.state == "scored":
            return f"scored; {BLIND}"
        return f"{row.state}: {row.message}" if isinstance(row.message, str) and row.message else str(row.state)

    return pd.DataFrame(
        {
            "run_id": summary["run_id"].astype(int),
            "attack": summary["attack"],
            "preset": [sized_preset(p, n) for p, n in zip(summary["preset"], summary["n"])],
            "state": summary["state"],
            "result": [result(row) for row in summary.itertuples()],
            "wall_s": summary["wall_s"].map(short_number),
            "cpu_s": summary["cpu_s"].map(short_number),
            "peak_memory_mb": summary["peak_memory_mb"].map(short_number),
            "created": summary["created_utc"].map(utc_minutes),
        }
    )[columns]


def short_number(value) -> str:
    """A number with 3 significant digits as text; empty for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.3g}"


def utc_minutes(value) -> str:
    """A stored UTC timestamp (ISO 8601 text or datetime) as '2026-05-01 14:03 UTC'; empty for
    a missing one, the text itself when it is not a time."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        return str(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


def readable_times(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every ``*_utc`` column as :func:`utc_minutes` text."""
    return frame.assign(**{c: frame[c].map(utc_minutes) for c in frame.columns if str(c).endswith("_utc")})


def challenge_listing(challenges: pd.DataFrame) -> pd.DataFrame:
    """The challenges as the board lists them: state ('open', 'open' and :data:`BLIND`, or
    'closed' and when), release ('secret key', or :data:`TEST_RELEASE`), hospitals, times in
    UTC minutes.

    challenges: :meth:`Store.challenges`."""
    columns = ["challenge_id", "task", "preset", "n_encoded", "sites", "release", "state", "submissions", "created"]
    if challenges.empty:
        return pd.DataFrame(columns=columns)
    sites = challenges["n_sites"] if "n_sites" in challenges else pd.Series(1, index=challenges.index)
    closed = challenges["closed_utc"]
    blinds = challenges["blind"] if "blind" in challenges else pd.Series(False, index=challenges.index)
    return pd.DataFrame(
        {
            "challenge_id": challenges["challenge_id"],
            "task": challenges["task"],
            "preset": challenges["preset"],
            "n_encoded": challenges["n_encoded"],
            "sites": sites.fillna(1).astype(int),
            "release": [TEST_RELEASE if test else "secret key" for test in challenges["test_release"]],
            "state": [
                (f"open, {BLIND}" if blind else "open") if pd.isna(c) or not c else f"closed {utc_minutes(c)}"
                for c, blind in zip(closed, blinds, strict=True)
            ],
            "submissions": challenges["submissions"],
            "created": challenges["created_utc"].map(utc_minutes),
        }
    )[columns]


def verified_compute(results: pd.DataFrame) -> pd.DataFrame:
    """The points of re-identification against compute: one per scored evaluation release, with
    its attack, preset, re-identification, wall and CPU seconds, and whether it was sandboxed."""
    columns = ["attack", "preset", "run_id", "idx", "reidentification", "wall_s", "cpu_s", "sandboxed"]
    if results.empty:
        return pd.DataFrame(columns=columns)
    return results.loc[results["release_state"] == "scored", columns].reset_index(drop=True)


def verified_commitments(rows: list[dict]) -> pd.DataFrame:
    """The commitments of evaluation releases (:func:`leaderboard.verified.runs.commitments`) as a
    table; the seed and the command that rebuilds the release once the challenge has closed."""
    columns = [
        "challenge_id",
        "run_id",
        "idx",
        "attack",
        "seed_sha256",
        "key_commitment",
        "release_sha256",
        "committed_utc",
        "seed",
        "rebuild",
    ]
    frame = pd.DataFrame(rows, columns=columns + ["revealed"])
    frame["seed"] = [seed if revealed else HIDDEN_SEED for seed, revealed in zip(frame["seed"], frame["revealed"])]
    frame["rebuild"] = frame["rebuild"].fillna("")
    return frame[columns]


def escape_markdown(text: str) -> str:
    """``text`` as inert Markdown on one line: HTML special characters as entities (no tag, no
    autolink), Markdown punctuation backslash-escaped (no link, image, emphasis, code or cell
    break), line breaks as spaces."""
    text = html.escape(" ".join(str(text).splitlines()), quote=True)
    return MARKDOWN_SPECIALS.sub(r"\\\1", text)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits, NaN as empty, text
    through :func:`escape_markdown`)."""

    def cell(value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return ""
            return "inf" if math.isinf(value) else f"{value:.4g}"
        return escape_markdown(value)

    header = "| " + " | ".join(str(c).replace("|", "\\|") for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def defuse_formula(value):
    """A text cell a spreadsheet would run as a formula, prefixed with a single quote (OWASP)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def to_csv(frame: pd.DataFrame) -> str:
    """RFC 4180 CSV text of ``frame`` (no index) whose text cells cannot start a formula
    (:func:`defuse_formula`). CRLF line ends make the writer quote a cell holding a bare CR,
    which a spreadsheet would otherwise read as the start of a new row (and a new formula)."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(defuse_formula)
    safe.columns = [defuse_formula(str(c)) for c in safe.columns]
    return safe.to_csv(index=False, lineterminator="\r\n")


def to_records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN becomes null, infinities the strings "inf" / "-inf"."""

    def clean(value):
        if value is pd.NA:
            return None
        if isinstance(value, (float, np.floating)):
            value = float(value)
            if math.isnan(value):
                return None
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return value
        if isinstance(value, np.integer):
            return int(value)
        return value

    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
