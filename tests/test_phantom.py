"""The ``phantom`` source: synthetic PA chest radiographs with exact finding labels (docs/format.md#data-manifests)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ncbench.challenge.phantom import LABEL_NAMES, render_phantoms
from ncbench.errors import NcbenchError

SIZE = 128


@pytest.fixture(scope="module")
def cohort() -> tuple[np.ndarray, np.ndarray]:
    """200 phantoms, (200, 128, 128) float32 and (200, K) int8: enough for group means to differ."""
    images, labels = render_phantoms(200, seed=7, image_size=SIZE)
    return images.astype(np.float32), labels


def _has(labels: np.ndarray, finding: str) -> np.ndarray:
    """(N,) bool: which images carry ``finding``."""
    return labels[:, LABEL_NAMES.index(finding)] == 1


def _box(images: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    """(N, h, w) crop of (N, S, S) images, rows and columns given as fractions of the side."""
    size = images.shape[-1]
    (top, bottom), (left, right) = (int(f * size) for f in rows), (int(f * size) for f in cols)
    return images[:, top:bottom, left:right]


def _lung_zone_mean(images: np.ndarray, rows: tuple[float, float]) -> np.ndarray:
    """(N,) mean of both lateral lung strips (away from the hila and heart) in ``rows``."""
    return (_box(images, rows, (0.12, 0.30)).mean(axis=(1, 2)) + _box(images, rows, (0.70, 0.88)).mean(axis=(1, 2))) / 2


def test_label_names_include_the_required_findings():
    assert {"cardiomegaly", "effusion", "nodule"} <= set(LABEL_NAMES)
    assert len(set(LABEL_NAMES)) == len(LABEL_NAMES)


def test_images_are_uint8_squares_and_labels_binary_int8():
    images, labels = render_phantoms(5, seed=0, image_size=64)
    assert images.shape == (5, 64, 64) and images.dtype == np.uint8
    assert labels.shape == (5, len(LABEL_NAMES)) and labels.dtype == np.int8
    assert set(np.unique(labels)) <= {0, 1}


def test_zero_images_gives_empty_arrays():
    images, labels = render_phantoms(0, seed=0, image_size=32)
    assert images.shape == (0, 32, 32) and labels.shape == (0, len(LABEL_NAMES))


@pytest.mark.parametrize("n, image_size", [(-1, 64), (4, 8)])
def test_negative_count_or_tiny_image_is_a_user_error(n, image_size):
    with pytest.raises(NcbenchError):
        render_phantoms(n, seed=0, image_size=image_size)


def test_same_seed_renders_identical_images_and_labels():
    first = render_phantoms(6, seed=11, image_size=48)
    second = render_phantoms(6, seed=11, image_size=48)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_prefix_of_a_larger_render_equals_the_smaller_render():
    # 50 px: an odd working grid; 7 images span a partial batch.
    images, labels = render_phantoms(7, seed=3, image_size=50)
    for k in (1, 3, 5):
        small_images, small_labels = render_phantoms(k, seed=3, image_size=50)
        np.testing.assert_array_equal(images[:k], small_images)
        np.testing.assert_array_equal(labels[:k], small_labels)


def test_different_seeds_give_different_images():
    images_a, _ = render_phantoms(4, seed=0, image_size=48)
    images_b, _ = render_phantoms(4, seed=1, image_size=48)
    assert not np.array_equal(images_a, images_b)
    assert all(not np.array_equal(a, b) for a, b in zip(images_a, images_b))


def test_every_image_in_a_render_is_distinct(cohort):
    images, _ = cohort
    assert len({image.tobytes() for image in images}) == len(images)


def test_labels_do_not_depend_on_image_size():
    _, small = render_phantoms(12, seed=5, image_size=32)
    _, large = render_phantoms(12, seed=5, image_size=96)
    np.testing.assert_array_equal(small, large)


def test_each_label_takes_both_values(cohort):
    _, labels = cohort
    for column, name in enumerate(LABEL_NAMES):
        assert set(np.unique(labels[:, column])) == {0, 1}, name


def test_each_finding_is_present_in_about_a_third_to_a_half_of_images(cohort):
    _, labels = cohort
    prevalence = labels.mean(axis=0)
    assert np.all((prevalence > 0.25) & (prevalence < 0.55)), dict(zip(LABEL_NAMES, prevalence))


def test_lungs_are_darker_than_the_mediastinum(cohort):
    images, _ = cohort
    lungs = _lung_zone_mean(images, (0.25, 0.5))
    mediastinum = _box(images, (0.2, 0.5), (0.46, 0.54)).mean(axis=(1, 2))
    assert np.all(lungs < mediastinum)
    assert (mediastinum - lungs).mean() > 50


def test_cardiomegaly_widens_the_bright_central_band(cohort):
    images, labels = cohort
    # At heart level, count the columns brighter than halfway between the image's dark lung and
    # bright heart: the width of the cardiac silhouette as a fraction of the strip.
    profile = np.median(_box(images, (0.55, 0.66), (0.1, 0.9)), axis=1)  # (N, W)
    halfway = (np.percentile(profile, 10, axis=1) + np.percentile(profile, 90, axis=1)) / 2
    width = (profile > halfway[:, None]).mean(axis=1)
    enlarged = _has(labels, "cardiomegaly")
    assert width[enlarged].mean() > width[~enlarged].mean() + 0.05


def test_effusion_brightens_the_lower_lung_zones(cohort):
    images, labels = cohort
    # Lower zone minus upper zone of the same film cancels exposure differences between films.
    lower_minus_upper = _lung_zone_mean(images, (0.62, 0.72)) - _lung_zone_mean(images, (0.3, 0.42))
    fluid = _has(labels, "effusion")
    assert lower_minus_upper[fluid].mean() > lower_minus_upper[~fluid].mean() + 8


def test_nodules_add_small_bright_spots_in_the_lung_fields(cohort):
    images, labels = cohort
    # Bright detail narrower than a tenth of the image both across and down: the white top-hat
    # with a horizontal line keeps spots but drops ribs, the vertical one drops long vessels.
    smooth = ndimage.gaussian_filter(images, (0, 1, 1))
    line = SIZE // 10
    spots = np.minimum(
        smooth - ndimage.grey_opening(smooth, size=(1, 1, line)),
        smooth - ndimage.grey_opening(smooth, size=(1, line, 1)),
    )
    lung_fields = np.concatenate(
        [_box(spots, (0.22, 0.62), (0.1, 0.36)), _box(spots, (0.22, 0.62), (0.64, 0.9))], axis=2
    )
    brightest_spot = lung_fields.max(axis=(1, 2))
    nodule = _has(labels, "nodule")
    assert brightest_spot[nodule].mean() > 1.3 * brightest_spot[~nodule].mean()
