"""The utility baseline: downstream AUC on encoded vs raw phantom images, on one site or several."""

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from streamlit.testing.v1 import AppTest

import ncbench.baselines.utility as utility_module
import ncbench.leaderboard as leaderboard
from ncbench.baselines.utility import (
    RAW_PRESET,
    auc,
    build_model,
    depth_preset,
    encode_images,
    encode_sites,
    predict,
    run_utility,
    site_slices,
    standardise,
    train_model,
)
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.phantom import LABEL_NAMES
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.leaderboard import tables
from ncbench.leaderboard.store import DB_ENV, Store, record_utility

torch.set_num_threads(2)

TINY = {
    "n_train": 96,
    "n_test": 48,
    "width": 64,
    "image_size": 64,
    "patch_size": 16,
    "epochs": 3,
    "seed": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def tiny_rows():
    return run_utility(presets=["nc7"], **TINY)


@pytest.fixture(scope="module")
def two_site_rows():
    return run_utility(presets=["nc3"], sites=2, **{**TINY, "epochs": 1})


def test_auc_matches_hand_computed_example():
    # positives 0.8, 0.4; negatives 0.6, 0.4, 0.1 -> pairs won: 0.8 beats 3, 0.4 beats 0.1 and ties 0.4
    # (1 + 0.5) -> (3 + 1.5) / 6 = 0.75
    assert auc([0.8, 0.6, 0.4, 0.4, 0.1], [1, 0, 1, 0, 0]) == pytest.approx(0.75)
    assert auc([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert auc([0.3, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auc([0.1, 0.9, 0.5], [-1, 1, 0]) == 1.0  # unknown labels ignored
    assert np.isnan(auc([0.1, 0.2], [1, 1]))


def test_tiny_run_has_every_label_and_kind(tiny_rows):
    keys = {(row["preset"], row["model_kind"], row["label"]) for row in tiny_rows}
    assert keys == {
        (preset, kind, name) for preset, kind in (("nc7", "encoded"), (RAW_PRESET, "raw")) for name in LABEL_NAMES
    }
    assert len(tiny_rows) == 2 * len(LABEL_NAMES)
    for row in tiny_rows:
        assert 0.0 <= row["auc"] <= 1.0
        assert row["settings"]["preset"] == row["preset"]
        assert {k: row["settings"][k] for k in TINY} == TINY


def test_models_learn_the_findings_at_a_small_size():
    # Cardiomegaly (heart width) is visible at 64 px: both models must beat chance clearly.
    rows = run_utility(
        presets=["nc7"], n_train=300, n_test=150, width=64, image_size=64, patch_size=8, epochs=8, seed=0, device="cpu"
    )
    auc_of = {(row["preset"], row["label"]): row["auc"] for row in rows}
    assert auc_of["nc7", "cardiomegaly"] > 0.75
    assert auc_of[RAW_PRESET, "cardiomegaly"] > 0.6


def test_several_presets_share_one_raw_reference():
    rows = run_utility(presets=["linear", "nc3"], **{**TINY, "epochs": 1})
    assert [row["preset"] for row in rows[:: len(LABEL_NAMES)]] == ["linear", "nc3", RAW_PRESET]
    no_raw = run_utility(presets=["nc3"], raw=False, **{**TINY, "epochs": 1})
    assert {row["model_kind"] for row in no_raw} == {"encoded"}


def test_standardise_uses_training_statistics_only():
    tokens = torch.randn(10, 4, 3) * 5 + 2
    tokens[6:] += 100.0  # a shifted test part must stay shifted
    standardised = standardise(tokens.clone(), slice(0, 6))
    torch.testing.assert_close(standardised[:6].mean(dim=(0, 1)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardised[:6].std(dim=(0, 1)), torch.ones(3), atol=1e-5, rtol=0)
    assert (standardised[6:].mean(dim=(0, 1)) > 5).all()


def test_encoded_model_is_invariant_to_token_permutation():
    config = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=16)
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    tokens = standardise(encode_images(images, config, seed=3, device="cpu"), slice(None))
    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 2, (16, 3)))
    model = train_model(tokens, labels, positional=False, epochs=1, seed=0)
    shuffled = tokens[:, torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(5))]
    assert not torch.equal(shuffled, tokens)
    np.testing.assert_allclose(predict(model, shuffled), predict(model, tokens), rtol=1e-5, atol=1e-6)
    # the raw reference has positions, so it is not invariant
    raw = build_model(tokens.shape[2], tokens.shape[1], 3, positional=True, seed=0).eval()
    assert not np.allclose(predict(raw, shuffled), predict(raw, tokens), atol=1e-6)


@torch.no_grad()
def test_raw_model_embeds_each_patch_with_its_grid_neighbours():
    model = build_model(16, 36, 3, positional=True, seed=0).eval()  # a 6 x 6 grid of 4 x 4 patches
    tokens = torch.randn(2, 36, 16, generator=torch.Generator().manual_seed(0))
    assert model(tokens).shape == (2, 3)
    changed = tokens.clone()
    changed[:, 0] += 1.0  # the top-left patch
    moved = (model.embed_tokens(changed) - model.embed_tokens(tokens)).abs().amax(dim=(0, 2)).reshape(6, 6)
    # two 3x3 convolutions: a patch reaches the patches up to two rows and two columns away
    assert (moved[:3, :3] > 0).all()
    assert (moved[3:, :] == 0).all() and (moved[:, 3:] == 0).all()


def test_raw_model_needs_a_square_patch_grid():
    with pytest.raises(NcbenchError, match="square patch grid"):
        build_model(16, 35, 3, positional=True, seed=0)


def test_depth_override_names_the_preset_and_marks_the_rows(monkeypatch):
    assert depth_preset("nc7", None) == "nc7" and depth_preset("nc7", 4) == "nc7"
    assert depth_preset("nc7", 16) == "nc7-depth16" and depth_preset("nc47", 44) == "nc47"
    seen = []
    real = utility_module.encode_images

    def spy(images, config, **kwargs):
        seen.append(config.depth)
        return real(images, config, **kwargs)

    monkeypatch.setattr(utility_module, "encode_images", spy)
    rows = run_utility(presets=["nc7"], depth=1, raw=False, **{**TINY, "epochs": 1})
    assert seen == [1]
    assert {row["preset"] for row in rows} == {"nc7-depth1"}
    assert all(row["settings"]["depth"] == 1 for row in rows)


def test_rows_record_into_store(tiny_rows, tmp_path):
    assert record_utility(tmp_path / "lb.db", tiny_rows) == len(tiny_rows)
    with Store(tmp_path / "lb.db") as store:
        frame = store.utility()
    assert len(frame) == len(tiny_rows)
    assert set(frame["model_kind"]) == {"encoded", "raw"}
    assert list(frame["auc"]) == pytest.approx([row["auc"] for row in tiny_rows])
    assert frame["settings"][0]["n_train"] == 96


def test_cli_utility_records(tmp_path):
    db = tmp_path / "lb.db"
    args = [
        "baseline",
        "utility",
        "--preset",
        "nc3",
        "--preset",
        "nc7",
        "--n-train",
        "48",
        "--n-test",
        "32",
        "--width",
        "32",
        "--image-size",
        "32",
        "--patch-size",
        "8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--db",
        str(db),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("AUC")).split()
    assert header == ["AUC", "nc3", "nc7", RAW_PRESET] and "effusion" in result.output
    with Store(db) as store:
        assert len(store.utility()) == 3 * len(LABEL_NAMES)


def test_cli_utility_error_is_one_line(tmp_path):
    result = CliRunner().invoke(
        main, ["baseline", "utility", "--preset", "nc3", "--image-size", "40", "--device", "cpu"]
    )
    assert result.exit_code != 0
    assert "multiple of 16" in result.output


def test_utility_trains_on_a_users_labelled_folder(tmp_path):
    # Phantom films saved as PNGs with a CheXpert-style labels CSV: the folder source path.
    from PIL import Image

    from ncbench.challenge.phantom import render_phantoms

    images, labels = render_phantoms(40, seed=1, image_size=32)
    lines = ["Path,Cardiomegaly,Pleural Effusion"]
    for k, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "films").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / "films" / f"img{k:03d}.png")
        lines.append(f"films/img{k:03d}.png,{float(label[0])},{float(label[1])}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    source = f"folder:{tmp_path / 'films'}?labels={tmp_path / 'labels.csv'}"
    rows = run_utility(
        presets=["nc3"],
        source=source,
        **{**TINY, "n_train": 24, "n_test": 16, "image_size": 32, "patch_size": 8, "epochs": 1},
    )
    assert {row["label"] for row in rows} == {"Cardiomegaly", "Pleural Effusion"}
    assert rows[0]["settings"]["source"] == source


def test_source_without_labels_is_refused_in_one_line():
    result = CliRunner().invoke(
        main,
        [
            "baseline",
            "utility",
            "--preset",
            "nc3",
            "--source",
            "sample",
            "--n-train",
            "8",
            "--n-test",
            "8",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code != 0
    assert "has no labels" in result.output and "Traceback" not in result.output


# -- several sites (hospitals with independent keys collaborating) -------------------------------


def test_site_slices_are_contiguous_near_equal_shares():
    assert site_slices(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert site_slices(4, 2, offset=10) == [slice(10, 12), slice(12, 14)]
    assert site_slices(5, 1) == [slice(0, 5)]


def test_each_site_encodes_the_same_image_under_its_own_key():
    # linear does not shuffle, so any difference comes from the key alone.
    config = resolve_config("linear", width=32, image_size=32, patch_size=8, bn_batch=16)
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    encodings = [encode_images(images, config, seed=0, device="cpu", site=site) for site in (None, 0, 1, 2)]
    for a in range(len(encodings)):
        for b in range(a + 1, len(encodings)):
            assert not torch.allclose(encodings[a], encodings[b], atol=1e-3)
    # the one-key encoding is the single-site run's key, unchanged
    torch.testing.assert_close(encodings[0], encode_images(images, config, seed=0, device="cpu"))


def test_each_site_is_standardised_with_its_own_training_statistics():
    config = resolve_config("nc3", width=32, image_size=32, patch_size=8, bn_batch=16)
    images = np.random.default_rng(2).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    train_sites, test_sites = site_slices(12, 2), site_slices(8, 2, offset=12)
    tokens = encode_sites(images, config, train_sites, test_sites, seed=0, device="cpu")
    for train in train_sites:
        torch.testing.assert_close(tokens[train].mean(dim=(0, 1)), torch.zeros(32), atol=1e-4, rtol=0)
        torch.testing.assert_close(tokens[train].std(dim=(0, 1)), torch.ones(32), atol=1e-4, rtol=0)
    # site 1's rows are site 1's encodings: its images encoded alone under its key, same statistics
    local = encode_images(np.concatenate([images[6:12], images[16:20]]), config, seed=0, device="cpu", site=1)
    standardise(local, slice(0, 6))
    torch.testing.assert_close(torch.cat([tokens[6:12], tokens[16:20]]), local)


def test_two_site_rows_say_how_each_model_was_trained_and_where_it_was_scored(two_site_rows):
    keys = {
        (row["preset"], row["model_kind"], row["settings"]["training"], row["settings"]["eval_site"], row["label"])
        for row in two_site_rows
    }
    expected = {
        ("nc3", "encoded", training, site, name)
        for training in ("site", "union", "one-key")
        for site in (0, 1)
        for name in LABEL_NAMES
    }
    expected |= {(RAW_PRESET, "raw", "raw", site, name) for site in (0, 1) for name in LABEL_NAMES}
    assert keys == expected and len(two_site_rows) == len(expected)
    for row in two_site_rows:
        assert row["settings"]["sites"] == 2 and row["settings"]["preset"] == row["preset"]
        assert {k: row["settings"][k] for k in TINY} == {**TINY, "epochs": 1}
        assert 0.0 <= row["auc"] <= 1.0


def test_one_site_rows_carry_no_site_settings(tiny_rows):
    assert not any({"sites", "training", "eval_site"} & set(row["settings"]) for row in tiny_rows)


def test_union_model_trains_on_every_sites_encodings(monkeypatch):
    calls = {}
    real = utility_module.train_model

    def spy(tokens, labels, **kwargs):
        calls[kwargs["label"]] = (tokens.clone(), labels.clone())
        return real(tokens, labels, **kwargs)

    monkeypatch.setattr(utility_module, "train_model", spy)
    run_utility(presets=["nc3"], sites=2, raw=False, **{**TINY, "epochs": 1})
    assert list(calls) == [
        "utility nc3 site 0",
        "utility nc3 site 1",
        "utility nc3 union of 2 keys",
        "utility nc3 one key",
    ]
    site0, site1 = calls["utility nc3 site 0"], calls["utility nc3 site 1"]
    union, one_key = calls["utility nc3 union of 2 keys"], calls["utility nc3 one key"]
    assert len(site0[0]) == len(site1[0]) == TINY["n_train"] // 2
    torch.testing.assert_close(union[0], torch.cat([site0[0], site1[0]]))
    assert torch.equal(union[1], torch.cat([site0[1], site1[1]]))
    # the same images, under one key instead of one per site
    assert union[0].shape == one_key[0].shape and torch.equal(union[1], one_key[1])
    assert not torch.allclose(union[0], one_key[0], atol=1e-3)


def test_multi_site_rows_record_and_stay_out_of_single_site_summaries(tiny_rows, two_site_rows, tmp_path):
    with Store(tmp_path / "lb.db") as store:
        store.record_utility(tiny_rows, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        alone = store.utility()
        store.record_utility(two_site_rows, now=dt.datetime(2026, 2, 1, tzinfo=dt.UTC))  # later: would be "latest"
        both = store.utility()
    assert len(both) == len(tiny_rows) + len(two_site_rows)
    assert {s.get("training") for s in both["settings"]} == {None, "site", "union", "one-key", "raw"}
    assert list(tables.latest_utility(both)["id"]) == list(tables.latest_utility(alone)["id"])
    pd.testing.assert_frame_equal(tables.utility_by_label(both), tables.utility_by_label(alone))
    no_attacks = tables.board(pd.DataFrame())
    pd.testing.assert_frame_equal(tables.privacy_utility(no_attacks, both), tables.privacy_utility(no_attacks, alone))
    assert tables.multi_site_summary(alone).empty
    summary = tables.multi_site_summary(both)
    assert list(summary["preset"]) == ["nc3"] and summary["sites"].tolist() == [2]


def run_rows(stamp: str, aucs: dict, *, presets=("nc3",)) -> list[dict]:
    """Hand-made rows of a 2-site run, 2 labels: aucs[training] = [[site 0: a, b], [site 1: c, d]]."""
    rows = []
    for training, per_site in aucs.items():
        for preset in presets if training != "raw" else (RAW_PRESET,):
            for site, values in enumerate(per_site):
                for label, value in zip(("cardiomegaly", "effusion"), values):
                    settings = {"preset": preset, "sites": 2, "training": training, "eval_site": site}
                    kind = "raw" if training == "raw" else "encoded"
                    rows.append(
                        {
                            "preset": preset,
                            "label": label,
                            "auc": value,
                            "model_kind": kind,
                            "settings": settings,
                            "created_utc": stamp,
                        }
                    )
    return rows


def test_multi_site_table_and_summary_average_sites_and_labels():
    old = run_rows(
        "2026-01-01",
        {
            "site": [[0.1, 0.1], [0.1, 0.1]],
            "union": [[0.1, 0.1], [0.1, 0.1]],
            "one-key": [[0.1, 0.1], [0.1, 0.1]],
            "raw": [[0.1, 0.1], [0.1, 0.1]],
        },
    )
    new = run_rows(
        "2026-02-01",
        {
            "site": [[0.6, 0.8], [0.5, 0.5]],
            "union": [[0.7, 0.9], [0.6, 0.6]],
            "one-key": [[0.8, 0.8], [0.8, 0.8]],
            "raw": [[0.9, 0.9], [0.7, 0.7]],
        },
    )
    frame = pd.DataFrame(old + new + [{**row, "preset": "x", "settings": {}} for row in new[:2]])  # x: single-site
    table = tables.multi_site_table(tables.latest_multi_site(frame))
    assert list(table.columns) == ["preset", "eval_site", "site", "union", "one-key", "raw"]
    assert table[["preset", "eval_site"]].values.tolist() == [["nc3", "0"], ["nc3", "1"], ["nc3", "mean"]]
    assert table["site"].tolist() == pytest.approx([0.7, 0.5, 0.6])
    assert table["raw"].tolist() == pytest.approx([0.9, 0.7, 0.8])
    by_label = tables.multi_site_table(tables.latest_multi_site(frame), by="label")
    assert by_label["label"].tolist() == ["cardiomegaly", "effusion", "mean"]
    assert by_label["union"].tolist() == pytest.approx([0.65, 0.75, 0.7])
    summary = tables.multi_site_summary(frame)
    assert summary.to_dict("records") == [
        {
            "preset": "nc3",
            "sites": 2,
            "per_site_auc": pytest.approx(0.6),
            "union_auc": pytest.approx(0.7),
            "one_key_auc": pytest.approx(0.8),
            "raw_auc": pytest.approx(0.8),
            "union_gain": pytest.approx(0.1),
            "key_cost": pytest.approx(0.1),
            "created_utc": "2026-02-01",
        }
    ]


def test_multi_site_raw_reference_comes_from_the_same_run():
    # nc3 recorded with a raw reference, nc7 later without one (--no-raw): nc7 shows no raw AUC.
    nc3 = run_rows("2026-01-01", {t: [[0.6, 0.6], [0.6, 0.6]] for t in ("site", "union", "one-key", "raw")})
    nc7 = run_rows("2026-02-01", {t: [[0.7, 0.7], [0.7, 0.7]] for t in ("site", "union", "one-key")}, presets=("nc7",))
    summary = tables.multi_site_summary(pd.DataFrame(nc3 + nc7)).set_index("preset")
    assert summary.loc["nc3", "raw_auc"] == pytest.approx(0.6)
    assert math.isnan(summary.loc["nc7", "raw_auc"]) and summary.loc["nc7", "union_auc"] == pytest.approx(0.7)


SMALL_CLI = ["--n-train", "48", "--width", "32", "--image-size", "32", "--patch-size", "8", "--device", "cpu"]


def test_cli_utility_across_sites_prints_each_site_and_a_verdict(tmp_path):
    db = tmp_path / "lb.db"
    args = [
        "baseline",
        "utility",
        "--preset",
        "nc3",
        "--sites",
        "2",
        "--n-test",
        "32",
        "--epochs",
        "1",
        "--db",
        str(db),
    ]
    result = CliRunner().invoke(main, args + SMALL_CLI)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("eval_site")))
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["0", "1", "mean"]
    assert lines[header].split() == ["eval_site", "per-site", "union", "one", "key", "raw"]
    verdict = next(line for line in lines if "collaboration across 2 independent keys" in line)
    assert verdict.startswith("nc3: ") and "union mean AUC" in verdict and "one key:" in verdict
    with Store(db) as store:
        recorded = store.utility()
    assert len(recorded) == 4 * 2 * len(LABEL_NAMES)  # site, union, one-key, raw; 2 sites each
    assert tables.multi_site_summary(recorded)["sites"].tolist() == [2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sites", "0", "--n-test", "32"], "sites must be a positive integer"),
        (["--sites", "40", "--n-test", "32"], "40 sites need at least 40 training and 40 test images"),
        (["--sites", "4", "--n-test", "8"], "test set (2 images) has one class only"),
    ],
)
def test_cli_bad_sites_is_one_line_with_exit_2(extra, message):
    result = CliRunner().invoke(main, ["baseline", "utility", "--preset", "nc3", *extra, *SMALL_CLI])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert message in result.output and "Traceback" not in result.output


def test_board_shows_several_sites_after_the_single_site_summary(tiny_rows, two_site_rows, tmp_path, monkeypatch):
    with Store(tmp_path / "lb.db") as store:
        store.record_utility(tiny_rows, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        store.record_utility(two_site_rows, now=dt.datetime(2026, 2, 1, tzinfo=dt.UTC))
    monkeypatch.setenv(DB_ENV, str(tmp_path / "lb.db"))
    at = AppTest.from_file(str(Path(leaderboard.__file__).parent / "board" / "app.py"), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Privacy vs utility").run()
    assert not at.exception, at.exception
    assert [s.value for s in at.subheader][-1] == "Several sites"
    assert list(at.dataframe[0].value["preset"]) == ["nc7"]  # the single-site summary: nc3 ran on 2 sites only
    over_seeds = at.dataframe[2].value  # one seed of nc7 and of raw: means without intervals
    assert sorted(over_seeds["preset"]) == ["nc7", "raw"] and set(over_seeds["auc_95ci"]) == {""}
    several = at.dataframe[3].value
    assert list(several["preset"]) == ["nc3"] and list(several["sites"]) == [2]
    assert at.dataframe[4].value["eval_site"].tolist() == ["0", "1", "mean"]
    sites_over_seeds = at.dataframe[5].value
    assert sites_over_seeds[["sites", "images_per_site", "seeds"]].values.tolist() == [[2, 48, 1]]
    gain = several["union_auc"].iloc[0] - several["per_site_auc"].iloc[0]
    assert (
        sites_over_seeds["union_gain"].iloc[0] == f"{gain:+.3f}" and sites_over_seeds["union_gain_95ci"].iloc[0] == ""
    )


CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)


def test_baseline_utility_reads_a_chexpert_train_csv(tmp_path):
    from PIL import Image

    root = tmp_path / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    lines = [CHEXPERT_HEADER]
    for k in range(24):
        image = root / "train" / f"patient{k:05d}" / "study1" / "view1_frontal.jpg"
        image.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(image)
        findings = [
            ("1.0", "0.0", "-1.0", "")[(k + j) % 4] if j % 3 else ("1.0" if k % 2 else "0.0") for j in range(14)
        ]
        lines.append(
            f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_frontal.jpg,Female,68,Frontal,AP,{','.join(findings)}"
        )
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    args = ["baseline", "utility", "--preset", "nc3", "--no-raw", "--n-train", "16", "--n-test", "8"]
    args += ["--width", "32", "--image-size", "32", "--patch-size", "8", "--epochs", "1", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--source", f"folder:{root}?labels={root / 'train.csv'}"])
    assert result.exit_code == 0, result.output
    assert "Cardiomegaly" in result.output and "Support Devices" in result.output and "Sex" not in result.output


# -- seeds and intervals -------------------------------------------------------------------------


def seed_rows(preset, kind, seed, aucs, *, created="2026-12-01T00:00:00Z", **settings):
    """One run's rows (two findings) as the store returns them."""
    shown = {"seed": seed, "n_train": 96, "n_test": 48, "width": 64, "image_size": 64, "patch_size": 16}
    shown |= {"epochs": 1, "source": "phantom", "model_version": 3, "threads": 1} | settings
    return [
        {"preset": preset, "label": label, "auc": value, "model_kind": kind, "settings": shown, "created_utc": created}
        for label, value in zip(("cardiomegaly", "effusion"), aucs)
    ]


def test_utility_intervals_pair_each_encoded_seed_with_the_raw_model_of_that_seed():
    encoded = {0: 0.6, 1: 0.7, 2: 0.8, 3: 0.75}  # seed -> mean AUC over the two findings
    raw = {2: 0.9, 1: 0.8, 0: 0.7}  # recorded in another order; no raw run at seed 3
    rows = [r for seed, v in encoded.items() for r in seed_rows("nc7", "encoded", seed, (v + 0.05, v - 0.05))]
    rows += [r for seed, v in raw.items() for r in seed_rows(RAW_PRESET, "raw", seed, (v, v))]
    rows += seed_rows(RAW_PRESET, "raw", 0, (0.1, 0.1), n_train=500)  # other images: never paired
    table = tables.utility_intervals(pd.DataFrame(rows)).set_index("preset")
    nc7 = table.loc["nc7"]
    assert nc7["seeds"] == 4 and nc7["seed_list"] == "0,1,2,3"
    # seeds 0-3: mean 0.7125, sd 0.0854, t(0.975, 3) = 3.1824 -> half-width 0.1359
    assert nc7["auc"] == pytest.approx(0.7125) and nc7["auc_high"] == pytest.approx(0.7125 + 0.1359, abs=1e-4)
    # Paired by seed (0, 1, 2): every difference is -0.1, so the interval has no width; paired by
    # position it would be -0.3, -0.1, +0.1.
    assert nc7["vs_raw_seeds"] == 3
    assert (nc7["vs_raw"], nc7["vs_raw_low"], nc7["vs_raw_high"]) == pytest.approx((-0.1, -0.1, -0.1))
    raw_rows = table[table["model_kind"] == "raw"]
    assert sorted(raw_rows["seeds"]) == [1, 3] and math.isnan(raw_rows["vs_raw"].iloc[0])


def test_a_rerun_seed_replaces_the_earlier_one_and_machines_do_not_split_a_setting():
    rows = seed_rows("nc3", "encoded", 0, (0.5, 0.5), created="2026-12-01T00:00:00Z")
    rows += seed_rows("nc3", "encoded", 0, (0.7, 0.7), created="2026-12-02T00:00:00Z")  # the same seed again
    rows += seed_rows("nc3", "encoded", 1, (0.9, 0.9), threads=2, device="cuda", precision="bf16")
    table = tables.utility_intervals(pd.DataFrame(rows))
    assert table["seeds"].tolist() == [2] and table["auc"].tolist() == pytest.approx([0.8])


def test_utility_intervals_of_an_empty_store_are_empty():
    assert tables.utility_intervals(pd.DataFrame(columns=["settings"])).empty
    assert tables.multi_site_intervals(pd.DataFrame(columns=["settings"])).empty


def test_multi_site_intervals_pair_union_and_per_site_models_of_one_run():
    rows = []
    gains = {0: 0.02, 1: 0.04, 2: 0.03}
    for seed, gain in gains.items():
        base = 0.6 + 0.05 * seed  # seeds differ far more than the gain
        for site in (0, 1):
            common = {"sites": 2, "eval_site": site, "n_train": 400}
            rows += seed_rows("nc7", "encoded", seed, (base, base), training="site", **common)
            rows += seed_rows("nc7", "encoded", seed, (base + gain, base + gain), training="union", **common)
    rows += seed_rows("nc7", "encoded", 0, (0.5, 0.5), n_train=1200)  # a single-site run: not here
    table = tables.multi_site_intervals(pd.DataFrame(rows))
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["sites"], row["images_per_site"], row["seeds"]) == (2, 200, 3)
    # gains 0.02, 0.04, 0.03: mean 0.03, sd 0.01, t(0.975, 2) = 4.3027 -> 0.03 +- 0.0248
    assert row["union_gain"] == pytest.approx(0.03)
    assert (row["union_gain_low"], row["union_gain_high"]) == pytest.approx((0.0052, 0.0548), abs=1e-4)
    assert row["site_low"] < row["union"] < row["site_high"]  # unpaired, the gain hides in the spread
    assert row["key_cost_seeds"] == 0 and math.isnan(row["key_cost"])  # no one-key model trained


def test_union_without_one_key_trains_no_one_key_model(monkeypatch):
    trained = []
    real = utility_module.train_model

    def spy(tokens, labels, **kwargs):
        trained.append(kwargs["label"])
        return real(tokens, labels, **kwargs)

    monkeypatch.setattr(utility_module, "train_model", spy)
    rows = run_utility(presets=["nc3"], sites=2, raw=False, one_key=False, **{**TINY, "epochs": 1})
    assert trained == ["utility nc3 site 0", "utility nc3 site 1", "utility nc3 union of 2 keys"]
    assert {row["settings"]["training"] for row in rows} == {"site", "union"}


def test_cli_seeds_record_every_seed_and_print_intervals_as_json(tmp_path):
    db = tmp_path / "lb.db"
    args = ["baseline", "utility", "--preset", "nc3", "--n-test", "32", "--epochs", "1", *SMALL_CLI]
    result = CliRunner().invoke(main, [*args, "--seed", "5", "--seeds", "2", "--json", "--db", str(db)])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["seeds"] == [5, 6]
    assert {row["settings"]["seed"] for row in found["rows"]} == {5, 6}
    by_model = {row["model_kind"]: row for row in found["intervals"]}
    assert by_model["encoded"]["seeds"] == by_model["encoded"]["vs_raw_seeds"] == 2
    assert by_model["encoded"]["seed_list"] == "5,6"
    low, mean, high = (by_model["encoded"][k] for k in ("auc_low", "auc", "auc_high"))
    assert low < mean < high
    with Store(db) as store:
        recorded = store.utility()
    assert len(recorded) == 2 * 2 * len(LABEL_NAMES)  # nc3 and raw at each seed
    assert tables.utility_intervals(recorded)["seeds"].tolist() == [2, 2]


def test_cli_zero_seeds_is_one_line_with_exit_2():
    result = CliRunner().invoke(main, ["baseline", "utility", "--preset", "nc3", "--seeds", "0", *SMALL_CLI])
    assert result.exit_code == 2 and "--seeds must be a positive integer" in result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
