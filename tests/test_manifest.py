"""Data manifests (docs/format.md#data-manifests): writing, reading, checksums, splits, and the sidecar schema."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ncbench.challenge.sample import SAMPLE_MANIFEST
from ncbench.challenge.sources import load_images
from ncbench.data_manifest.manifest import (
    assign_splits,
    read_manifest,
    read_sidecar,
    validate_sidecar,
    write_manifest,
)
from ncbench.errors import NcbenchError
from ncbench.h5io import sha256_file

SCHEMA = Path(__file__).resolve().parents[1] / "data_manifest" / "schema.json"


@pytest.fixture
def folder(tmp_path):
    """Five 8-bit PNGs in two sub-folders plus a CheXpert-style labels.csv."""
    root = tmp_path / "cohort"
    for k in range(5):
        path = root / f"p{k % 2}" / f"img{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 10), 40 * k, dtype=np.uint8)).save(path)
    (root / "labels.csv").write_text(
        "Path,Sex,Cardiomegaly,Effusion\n"
        "cohort/p0/img0.png,Male,1.0,0.0\n"
        "cohort/p1/img1.png,Female,-1.0,\n"
        "cohort/p0/img4.png,Male,0.0,1.0\n"
    )
    return root


def test_manifest_round_trip(folder, tmp_path):
    out = write_manifest(
        folder,
        tmp_path / "set.csv",
        name="cohort",
        licence="CC-BY-4.0",
        split_fractions={"train": 0.6, "val": 0.2, "test": 0.2},
        seed=1,
    )
    frame = read_manifest(out, root=folder)
    assert list(frame.columns[:6]) == ["id", "path", "sha256", "split", "Cardiomegaly", "Effusion"]
    assert list(frame["id"]) == [f"p{k % 2}/img{k}.png" for k in (0, 2, 4, 1, 3)]
    assert all(sha256_file(f) == s for f, s in zip(frame["file"], frame["sha256"]))
    assert frame["split"].value_counts().to_dict() == {"train": 3, "val": 1, "test": 1}
    labels = dict(zip(frame["id"], frame[["Cardiomegaly", "Effusion"]].to_numpy().tolist()))
    assert labels["p0/img0.png"] == [1, 0] and labels["p1/img1.png"] == [-1, -1]
    assert labels["p0/img4.png"] == [0, 1] and labels["p0/img2.png"] == [-1, -1]
    sidecar = read_sidecar(out)
    assert sidecar["counts_per_split"] == {"train": 3, "val": 1, "test": 1}
    assert sidecar["label_names"] == ["Cardiomegaly", "Effusion"]
    assert sidecar["licence"] == "CC-BY-4.0" and str(tmp_path) not in json.dumps(sidecar)


def test_without_fractions_every_file_is_test(folder, tmp_path):
    out = write_manifest(folder, tmp_path / "set.csv", name="cohort", licence="x")
    assert set(read_manifest(out)["split"]) == {"test"}


def test_splits_are_seeded(folder, tmp_path):
    fractions = {"train": 0.4, "test": 0.6}
    first = write_manifest(folder, tmp_path / "a.csv", name="a", licence="x", split_fractions=fractions, seed=7)
    again = write_manifest(folder, tmp_path / "b.csv", name="b", licence="x", split_fractions=fractions, seed=7)
    assert list(read_manifest(first)["split"]) == list(read_manifest(again)["split"])


@given(
    count=st.integers(0, 200), weights=st.lists(st.integers(0, 10), min_size=1, max_size=4), seed=st.integers(0, 2**32)
)
@settings(max_examples=50, deadline=None)
def test_split_sizes_follow_the_fractions(count, weights, seed):
    if sum(weights) == 0:
        weights = [1] + weights[1:]
    fractions = {f"s{k}": w / sum(weights) for k, w in enumerate(weights)}
    splits = assign_splits(count, fractions, seed)
    assert len(splits) == count
    for name, fraction in fractions.items():
        assert abs((splits == name).sum() - fraction * count) < 1


def test_manifest_source_loads_a_split_like_the_folder_source(folder, tmp_path):
    out = write_manifest(
        folder, tmp_path / "set.csv", name="cohort", licence="x", split_fractions={"train": 0.6, "test": 0.4}, seed=0
    )
    train = set(read_manifest(out).query("split == 'train'")["id"])
    images = load_images(f"manifest:{out}?root={folder}&split=train", n=3, seed=0, image_size=8)
    assert set(images.ids) == train and list(images.ids) == sorted(images.ids)
    assert images.label_names == ("Cardiomegaly", "Effusion") and images.labels.dtype == np.int8
    from_folder = load_images(f"folder:{folder}", n=5, seed=0, image_size=8)
    by_id = dict(zip(from_folder.ids, from_folder.images))
    assert all(np.array_equal(by_id[i], image) for i, image in zip(images.ids, images.images))
    assert str(tmp_path) not in images.description


def test_manifest_root_defaults_to_its_directory(folder):
    out = write_manifest(folder, folder / "manifest.csv", name="cohort", licence="x")
    assert len(load_images(f"manifest:{out}", n=5, seed=0, image_size=8)) == 5


def test_modified_file_is_detected(folder, tmp_path):
    out = write_manifest(folder, tmp_path / "set.csv", name="cohort", licence="x")
    Image.fromarray(np.full((12, 10), 7, dtype=np.uint8)).save(folder / "p1" / "img3.png")
    with pytest.raises(NcbenchError, match=re.escape(str(folder / "p1" / "img3.png"))):
        load_images(f"manifest:{out}?root={folder}", n=5, seed=0, image_size=8)


def test_more_images_than_the_split_holds(folder, tmp_path):
    out = write_manifest(
        folder, tmp_path / "set.csv", name="cohort", licence="x", split_fractions={"train": 0.6, "test": 0.4}
    )
    with pytest.raises(NcbenchError, match=r"set\.csv \(split test\) holds 2 images, 3 requested"):
        load_images(f"manifest:{out}?root={folder}&split=test", n=3, seed=0)
    with pytest.raises(NcbenchError, match=r"no split 'val'"):
        load_images(f"manifest:{out}?root={folder}&split=val", n=1, seed=0)


def test_write_manifest_refuses_to_overwrite(folder, tmp_path):
    out = write_manifest(folder, tmp_path / "set.csv", name="cohort", licence="x")
    before = out.read_bytes()
    with pytest.raises(NcbenchError, match="already exists"):
        write_manifest(folder, out, name="other", licence="y")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "set.csv", "set.json"]


def test_missing_sidecar_is_named(folder, tmp_path):
    out = write_manifest(folder, tmp_path / "set.csv", name="cohort", licence="x")
    out.with_suffix(".json").unlink()
    with pytest.raises(NcbenchError, match=re.escape(str(tmp_path / "set.json"))):
        read_manifest(out)


def test_manifest_with_wrong_columns_is_refused(tmp_path):
    (tmp_path / "bad.csv").write_text("id,file,sha256,split\na,a.png," + "0" * 64 + ",test\n")
    with pytest.raises(NcbenchError, match=r"bad\.csv: columns must start with id, path"):
        read_manifest(tmp_path / "bad.csv")


def test_sidecar_counts_must_match_the_csv(folder, tmp_path):
    out = write_manifest(folder, tmp_path / "set.csv", name="cohort", licence="x")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    sidecar["counts_per_split"] = {"test": 4}
    out.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(NcbenchError, match="counts_per_split"):
        read_manifest(out)


def test_sample_manifest_lists_the_two_films():
    frame = read_manifest(SAMPLE_MANIFEST)
    assert list(frame["id"]) == ["RG1", "RG3"]
    assert list(frame["path"]) == ["RG1_UNCR.dcm", "RG3_UNCR.dcm"]
    assert frame.attrs["sidecar"]["licence"] == "MIT"


def test_schema_is_valid_and_accepts_the_sample_sidecar():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(read_sidecar(SAMPLE_MANIFEST), schema, cls=jsonschema.Draft202012Validator)


VALID = read_sidecar(SAMPLE_MANIFEST)
ODD_VALUES = [
    None,
    True,
    0,
    1,
    2,
    -1,
    1.5,
    "",
    "x",
    "2026-11-27T18:45:00Z",
    "2026-11-27",
    [],
    ["a"],
    ["a", "a"],
    [""],
    [{"name": "t", "description": "d"}],
    [{"name": "t"}],
    [{"name": "t", "description": "d", "kind": "gauss"}],
    [{"name": "t", "description": "d", "p": 2}],
    {},
    {"test": 3},
    {"test": -1},
    {"bad split": 1},
    {"test": True},
]
KEYS = list(VALID) + ["extra"]


@given(
    edits=st.lists(
        st.tuples(st.sampled_from(KEYS), st.one_of(st.none().map(lambda _: "DELETE"), st.sampled_from(ODD_VALUES))),
        max_size=3,
    )
)
@settings(max_examples=150, deadline=None)
def test_hand_validator_agrees_with_the_json_schema(edits):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    sidecar = copy.deepcopy(VALID)
    for key, value in edits:
        if value == "DELETE":
            sidecar.pop(key, None)
        else:
            sidecar[key] = copy.deepcopy(value)
    try:
        validate_sidecar(sidecar)
        accepted = True
    except NcbenchError:
        accepted = False
    assert accepted == validator.is_valid(sidecar)
