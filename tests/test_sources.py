"""Image sources (docs/format.md#data-manifests): folder, sample, phantom, and the errors a user can run into."""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import ncbench.challenge.sample as sample_source
from ncbench.challenge.sample import SAMPLE_MANIFEST, SAMPLE_VIEW_TRANSFORMS
from ncbench.challenge.sources import load_images
from ncbench.errors import NcbenchError


def write_image(path, pixels):
    """PNG or JPEG by suffix, 8-bit or 16-bit by dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None):
    """A minimal single-frame 16-bit DICOM Part 10 file (preamble + file meta)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital x-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    if slope is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def ramp(height=24, width=24, top=4095):
    """Left-to-right intensity ramp."""
    return np.tile(np.linspace(0, top, width), (height, 1)).astype(np.uint16)


@pytest.fixture
def mixed_folder(tmp_path):
    """One PNG, one JPEG, one .dcm DICOM and one suffix-less DICOM, in nested folders."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    write_image(folder / "b.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    write_image(folder / "sub" / "a.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    write_dicom(folder / "sub" / "deeper" / "c.dcm", ramp())
    write_dicom(folder / "d", ramp())
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---------------------------------------------------------------------------------------------
# folder:PATH


def test_folder_finds_png_jpeg_and_dicom_with_relative_ids(mixed_folder):
    images = load_images(f"folder:{mixed_folder}", n=4, seed=0, image_size=16)
    assert images.ids == ("b.png", "d", "sub/a.jpg", "sub/deeper/c.dcm")
    assert images.images.shape == (4, 16, 16) and images.images.dtype == np.uint8
    assert images.labels.shape == (4, 0) and images.label_names == ()
    assert str(mixed_folder.parent) not in images.description


def test_folder_subset_is_seeded_and_sorted_by_id(tmp_path):
    for k in range(8):
        write_image(tmp_path / f"img{k}.png", np.full((8, 8), k * 30, dtype=np.uint8))
    first = load_images(f"folder:{tmp_path}", n=3, seed=5, image_size=8)
    again = load_images(f"folder:{tmp_path}", n=3, seed=5, image_size=8)
    assert first.ids == again.ids and list(first.ids) == sorted(first.ids)
    assert np.array_equal(first.images, again.images)
    chosen = {load_images(f"folder:{tmp_path}", n=3, seed=s, image_size=8).ids for s in range(6)}
    assert len(chosen) > 1


def test_png_is_resized_without_keeping_aspect_ratio(tmp_path):
    pixels = np.zeros((10, 40), dtype=np.uint8)
    pixels[:, 20:] = 255
    write_image(tmp_path / "wide.png", pixels)
    image = load_images(f"folder:{tmp_path}", n=1, seed=0, image_size=16).images[0]
    assert image.shape == (16, 16)
    assert (image[:, :7] == 0).all() and (image[:, 9:] == 255).all()


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    pixels = np.full((8, 8), 128 * 257, dtype=np.uint16)
    pixels[:4] = 65535
    write_image(tmp_path / "deep.png", pixels)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_images(f"folder:{tmp_path}", n=1, seed=0, image_size=8).images[0]
    assert (image[:3] == 255).all() and (image[5:] == 128).all()


def test_dicom_monochrome1_is_inverted(tmp_path):
    write_dicom(tmp_path / "m2.dcm", ramp(), photometric="MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1")
    images = load_images(f"folder:{tmp_path}", n=2, seed=0, image_size=24)
    inverted, plain = images.images.astype(int)  # ids sorted: m1.dcm, m2.dcm
    assert plain[:, 0].max() == 0 and plain[:, -1].min() == 255
    assert np.abs(inverted + plain - 255).max() <= 1


def test_dicom_modality_rescale_is_applied(tmp_path):
    # A negative slope flips intensities, so only a reader that applies the rescale matches.
    write_dicom(tmp_path / "a_plain.dcm", ramp(), photometric="MONOCHROME2")
    write_dicom(tmp_path / "b_rescaled.dcm", ramp(), photometric="MONOCHROME2", slope=-1, intercept=4095)
    plain, rescaled = load_images(f"folder:{tmp_path}", n=2, seed=0, image_size=24).images
    assert np.abs(plain.astype(int) + rescaled.astype(int) - 255).max() <= 1


def test_dicom_is_windowed_to_percentiles(tmp_path):
    pixels = ramp(40, 40, top=1000)
    pixels[0, 0] = 4095  # one burnt-in marker pixel must not squash the anatomy's contrast
    write_dicom(tmp_path / "marker.dcm", pixels)
    image = load_images(f"folder:{tmp_path}", n=1, seed=0, image_size=40).images[0]
    assert image[1:, -1].min() >= 250 and image[1:, 0].max() <= 5  # unwindowed: top 62


def write_chexpert_folder(root):
    """CheXpert layout: relative paths prefixed by the dataset folder, metadata columns."""
    folder = root / "CheXpert-v1.0-small"
    for patient in ("patient00001", "patient00002", "patient00003"):
        write_image(folder / "train" / patient / "study1" / "view1_frontal.jpg", np.full((8, 8), 100, dtype=np.uint8))
    table = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Pleural Effusion\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
        "1.0,0.0,\n"
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,87,Frontal,AP,"
        ",-1.0,1.0\n"
        "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg,Male,40,Frontal,PA,"
        "1.0,1.0,1.0\n"
    )
    return folder, table


def test_chexpert_labels_csv_is_read_from_the_folder(tmp_path):
    folder, table = write_chexpert_folder(tmp_path)
    (folder / "labels.csv").write_text(table)
    images = load_images(f"folder:{folder}", n=3, seed=0, image_size=8)
    assert images.label_names == ("No Finding", "Cardiomegaly", "Pleural Effusion")
    assert images.ids[0] == "train/patient00001/study1/view1_frontal.jpg"
    assert images.labels.dtype == np.int8
    assert images.labels.tolist() == [[1, 0, -1], [-1, -1, 1], [-1, -1, -1]]


def test_labels_csv_can_be_named_in_the_spec(tmp_path):
    folder, table = write_chexpert_folder(tmp_path)
    (tmp_path / "train.csv").write_text(table)
    images = load_images(f"folder:{folder}?labels={tmp_path / 'train.csv'}", n=3, seed=0, image_size=8)
    assert images.labels[:, 1].tolist() == [0, -1, -1]


def test_labels_csv_with_bad_value_names_the_csv(tmp_path):
    folder, _ = write_chexpert_folder(tmp_path)
    (folder / "labels.csv").write_text("Path,Cardiomegaly\ntrain/patient00001/study1/view1_frontal.jpg,2.0\n")
    with pytest.raises(NcbenchError, match=r"labels\.csv.*Cardiomegaly"):
        load_images(f"folder:{folder}", n=1, seed=0, image_size=8)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(NcbenchError, match=re.escape(f"folder {tmp_path / 'nowhere'} does not")):
        load_images(f"folder:{tmp_path / 'nowhere'}", n=1, seed=0)


def test_folder_without_images_is_named(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(NcbenchError, match=re.escape(f"folder {tmp_path} holds no")):
        load_images(f"folder:{tmp_path}", n=1, seed=0)


def test_corrupt_image_names_the_file(tmp_path):
    write_image(tmp_path / "good.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(NcbenchError, match=re.escape(str(tmp_path / "broken.png"))) as raised:
        load_images(f"folder:{tmp_path}", n=2, seed=0, image_size=8)
    assert " at 0x" not in str(raised.value)  # no address of Pillow's in-memory file


def test_images_decoded_on_threads_are_those_decoded_one_at_a_time_in_order(tmp_path):
    from ncbench.challenge.images import decode_resized

    rng = np.random.default_rng(7)
    for k in range(24):  # sizes differ, so fast and slow decodes finish out of order
        write_image(tmp_path / f"img{k:02d}.png", rng.integers(0, 256, (8 + 9 * k, 40), dtype=np.uint8))
    images = load_images(f"folder:{tmp_path}", n=24, seed=0, image_size=16)
    one_at_a_time = [decode_resized((tmp_path / name).read_bytes(), name, 16) for name in images.ids]
    np.testing.assert_array_equal(images.images, np.stack(one_at_a_time))


def test_a_bad_image_stops_the_decoding_of_the_rest(tmp_path, monkeypatch):
    """The first bad file is named and the images queued behind it are not decoded."""
    import ncbench.challenge.sources as sources

    for k in range(40):
        write_image(tmp_path / f"img{k:02d}.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "img03.png").write_bytes(b"not a png")
    decoded = []
    real = sources.decode_resized

    def counting(content, name, size):
        decoded.append(name)
        if name > str(tmp_path / "img03.png"):
            time.sleep(0.05)  # the rest would otherwise all be done before the error is seen
        return real(content, name, size)

    monkeypatch.setattr(sources, "decode_resized", counting)
    with pytest.raises(NcbenchError, match="img03.png"):
        load_images(f"folder:{tmp_path}", n=40, seed=0, image_size=8)
    assert len(decoded) < 40


def test_more_images_than_the_folder_holds(tmp_path):
    for k in range(3):
        write_image(tmp_path / f"{k}.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(NcbenchError, match=re.escape(f"folder {tmp_path} holds 3 images, 5 requested")):
        load_images(f"folder:{tmp_path}", n=5, seed=0)


@pytest.mark.parametrize("spec", ["nonsense", "folder:", "folders:/x", "Sample", "manifest:"])
def test_unknown_source_lists_valid_forms(spec):
    with pytest.raises(NcbenchError, match=r"folder:PATH.*manifest:FILE"):
        load_images(spec, n=1, seed=0)


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(NcbenchError, match="unknown option 'lables'"):
        load_images(f"folder:{tmp_path}?lables=x.csv", n=1, seed=0)


@pytest.mark.parametrize("n", [0, -3])
def test_n_below_one_is_refused(n):
    with pytest.raises(NcbenchError, match="positive integer"):
        load_images("sample", n=n, seed=0)


# ---------------------------------------------------------------------------------------------
# sample


def test_sample_views_are_distinct_uint8_and_sized():
    views = load_images("sample", n=40, seed=0, image_size=32)
    assert views.images.shape == (40, 32, 32) and views.images.dtype == np.uint8
    assert len({image.tobytes() for image in views.images}) == 40
    assert all(re.fullmatch(r"sample-RG[13]-v\d{6}", i) for i in views.ids)
    assert [int(i[-6:]) for i in views.ids] == list(range(40))
    assert views.labels.shape == (40, 0) and views.label_names == ()
    assert "not a cohort" in views.description and views.description.startswith("40 views")


def test_sample_is_deterministic_per_seed():
    first = load_images("sample", n=6, seed=3, image_size=32)
    again = load_images("sample", n=6, seed=3, image_size=32)
    other = load_images("sample", n=6, seed=4, image_size=32)
    assert first.ids == again.ids and np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)


def test_sample_view_k_does_not_depend_on_n_or_batching(monkeypatch):
    short = load_images("sample", n=4, seed=1, image_size=32)
    monkeypatch.setattr(sample_source, "SAMPLE_BATCH_PIXELS", 3 * 32 * 32)  # batches of 3 views
    long = load_images("sample", n=10, seed=1, image_size=32)
    assert long.ids[:4] == short.ids
    assert np.array_equal(long.images[:4], short.images)


def test_sample_is_mostly_chest_views():
    ids = load_images("sample", n=300, seed=0, image_size=8).ids
    chest = sum(i.startswith("sample-RG1") for i in ids) / len(ids)
    assert 0.7 < chest < 0.9


def test_sample_checks_film_sha256_against_its_manifest(tmp_path, monkeypatch):
    manifest = tmp_path / "sample.csv"
    shutil.copy(SAMPLE_MANIFEST.with_suffix(".json"), tmp_path / "sample.json")
    text = SAMPLE_MANIFEST.read_text()
    good = re.search(r"RG1_UNCR\.dcm,([0-9a-f]{64})", text).group(1)
    manifest.write_text(text.replace(good, "0" * 64))
    monkeypatch.setattr(sample_source, "SAMPLE_MANIFEST", manifest)
    with pytest.raises(NcbenchError, match=r"RG1_UNCR\.dcm: sha256 .* does not match"):
        load_images("sample", n=2, seed=0, image_size=8)


def test_sample_sidecar_records_the_transform_table():
    sidecar = json.loads(SAMPLE_MANIFEST.with_suffix(".json").read_text())
    assert sidecar["transforms"] == [t.as_dict() for t in SAMPLE_VIEW_TRANSFORMS]
    assert sidecar["licence"] == "MIT" and "not a cohort" in sidecar["description"]


# ---------------------------------------------------------------------------------------------
# phantom


def test_phantom_delegates_to_the_generator():
    phantom = pytest.importorskip("ncbench.challenge.phantom")
    images = load_images("phantom", n=3, seed=0, image_size=32)
    assert images.ids == ("phantom-000000", "phantom-000001", "phantom-000002")
    assert images.images.shape == (3, 32, 32) and images.images.dtype == np.uint8
    assert images.labels.shape == (3, len(phantom.LABEL_NAMES))
    assert images.label_names == tuple(phantom.LABEL_NAMES)
    assert "synthetic" in images.description


def test_a_manifest_of_a_chexpert_folder_keeps_its_findings_and_reads_from_root(tmp_path):
    """docs/format.md#image-sources: `challenge manifest FOLDER --labels train.csv`, then
    `manifest:FILE?root=FOLDER`, the manifest kept away from the images."""
    from click.testing import CliRunner

    from ncbench.cli import main

    folder, table = write_chexpert_folder(tmp_path)
    (tmp_path / "train.csv").write_text(table)
    out = tmp_path / "elsewhere" / "chexpert.csv"
    written = CliRunner().invoke(
        main,
        ["challenge", "manifest", str(folder), "--out", str(out), "--name", "chexpert-small"]
        + ["--labels", str(tmp_path / "train.csv")],
    )
    assert written.exit_code == 0, written.output
    images = load_images(f"manifest:{out}?root={folder}", n=3, seed=0, image_size=8)
    assert images.label_names == ("No Finding", "Cardiomegaly", "Pleural Effusion")
    by_id = dict(zip(images.ids, images.labels.tolist()))
    assert by_id["train/patient00001/study1/view1_frontal.jpg"] == [1, 0, -1]
    assert by_id["train/patient00002/study1/view1_frontal.jpg"] == [-1, -1, 1]
    assert by_id["train/patient00003/study1/view1_frontal.jpg"] == [-1, -1, -1]  # no row: unknown
    with pytest.raises(NcbenchError):  # without ?root= the paths are read beside the manifest
        load_images(f"manifest:{out}", n=3, seed=0, image_size=8)
