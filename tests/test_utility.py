"""The utility baseline: downstream AUC on encoded vs raw phantom images."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncbench.baselines.utility import (
    RAW_PRESET,
    auc,
    build_model,
    encode_images,
    predict,
    run_utility,
    standardise,
    train_model,
)
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.phantom import LABEL_NAMES
from ncbench.cli import main
from ncbench.leaderboard.store import Store, record_utility

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
