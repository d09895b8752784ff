"""`ncbench challenge build` and `challenge manifest` refuse bad numbers in one line, before any work.

Every case here fails before the images are loaded (``load_images`` is replaced by a tripwire), so
each runs in a fraction of a second and creates nothing.
"""

import pytest
from click.testing import CliRunner
from helpers import png_folder

import ncbench.challenge.release as release_module
from ncbench.challenge.config import MAX_PATCHES, MAX_SIZE, resolve_config
from ncbench.challenge.release import BuildPlan, _check_memory
from ncbench.cli import main
from ncbench.errors import NcbenchError

GIB = 1 << 30
HUGE = 10**20  # past numpy's 64-bit integers
# A tiny valid build; each case changes or adds options.
TINY = {
    "--preset": "nc3",
    "--n": 8,
    "--width": 16,
    "--image-size": 32,
    "--patch-size": 8,
    "--bn-batch": 4,
    "--source": "phantom",
    "--device": "cpu",
    "--seed": 7,
}
LINK = {"--task": "link", "--sites": 2, "--n": 32}

BAD_BUILDS = {
    "patch size 0": ({"--patch-size": 0}, "patch_size must be positive, got 0"),
    "patch size -1": ({"--patch-size": -1}, "patch_size must be positive, got -1"),
    "patch size huge": ({"--patch-size": HUGE}, f"patch_size must be at most {MAX_SIZE:,}"),
    "patch size not dividing the image": ({"--patch-size": 3}, "image_size 32 is not a multiple of patch_size 3"),
    "patch size nan": ({"--patch-size": "nan"}, "'nan' is not a valid integer"),
    "image size 0": ({"--image-size": 0}, "image_size must be positive, got 0"),
    "image size -1": ({"--image-size": -1}, "image_size must be positive, got -1"),
    "image size huge": ({"--image-size": HUGE}, f"image_size must be at most {MAX_SIZE:,}"),
    "image size not a multiple": ({"--image-size": 30}, "image_size 30 is not a multiple of patch_size 8"),
    "more patches than int16 holds": (
        {"--image-size": 256, "--patch-size": 1},
        f"make 65,536 patches per image; patch permutations are stored as int16, which holds at most {MAX_PATCHES:,}",
    ),
    "width 0": ({"--width": 0}, "width must be positive, got 0"),
    "width -1": ({"--width": -1}, "width must be positive, got -1"),
    "width huge": ({"--width": HUGE}, f"width must be at most {MAX_SIZE:,}"),
    "width inf": ({"--width": "inf"}, "'inf' is not a valid integer"),
    "bn batch 0": ({"--bn-batch": 0}, "bn_batch must be positive, got 0"),
    "bn batch -1": ({"--bn-batch": -1}, "bn_batch must be positive, got -1"),
    "bn batch huge": ({"--bn-batch": HUGE}, f"bn_batch must be at most {MAX_SIZE:,}"),
    "n 0": ({"--n": 0}, "--n must be at least 2, got 0"),
    "n -1": ({"--n": -1}, "--n must be at least 2, got -1"),
    "n huge": ({"--n": HUGE}, f"--n must be at most {MAX_SIZE:,}"),
    "n nan": ({"--n": "nan"}, "'nan' is not a valid integer"),
    "n-aux 0": ({"--task": "transfer", "--n-aux": 0}, "transfer needs --n-aux >= 1"),
    "n-aux huge": ({"--task": "transfer", "--n-aux": HUGE}, f"--n-aux must be at most {MAX_SIZE:,}"),
    "n-targets 1": ({"--task": "transfer", "--n-targets": 1}, "--n-targets >= 2"),
    "n-targets huge": ({"--task": "transfer", "--n-targets": HUGE}, f"--n-targets must be at most {MAX_SIZE:,}"),
    "n-known 0": ({"--task": "invert", "--n-known": 0}, "--n-known must be between 1 and 7, got 0"),
    "n-known huge": ({"--task": "invert", "--n-known": HUGE}, "--n-known must be between 1 and 7"),
    "sites 0": ({"--sites": 0}, "--sites must be between 1 and 16, got 0"),
    "sites huge": ({"--sites": HUGE}, "--sites must be between 1 and 16"),
    **{
        f"overlap {value}": ({**LINK, "--overlap": value}, f"(0 < overlap <= 0.5), got {shown}")
        for value, shown in (("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), (-1, "-1.0"), (0, "0.0"), (2, "2.0"))
    },
    "overlap too small to share an image": ({**LINK, "--overlap": 0.01}, "got 0.01"),
    # Up-front memory estimate (this machine: 1 GiB available).
    "more images than memory": (
        {"--n": 2_000_000_000},
        "loading 2,000,000,000 images of 32x32 pixels takes at least 2.1 TB; this machine has 1.1 GB",
    ),
    "larger images than memory": (
        {"--image-size": 100_000, "--patch-size": 1000},
        "loading 8 images of 100000x100000 pixels takes at least 240.0 GB; this machine has 1.1 GB",
    ),
    "a batch of wide encodings larger than memory": (
        {"--preset": "linear", "--width": 100_000, "--image-size": 256, "--patch-size": 16, "--bn-batch": 256},
        "encoding a batch of 8 images (256 patches of width 100,000 each) with its key takes at least 1.4 GB",
    ),
    "many images in one batch at a large width": (
        {"--n": 10_000, "--bn-batch": 10_000, "--width": 4096},
        "encoding a batch of 10,000 images (16 patches of width 4,096 each) with its key takes at least",
    ),
    "a key larger than memory": ({"--width": 100_000_000}, "the nc3 key of width 100000000 and the encoder's copy"),
}


@pytest.fixture(autouse=True)
def small_machine(monkeypatch):
    """1 GiB of memory, and a tripwire for any build that gets as far as loading its images."""
    loaded = []

    def tripwire(*args, **kwargs):
        loaded.append(kwargs)
        raise AssertionError("the build loaded its images before refusing them")

    monkeypatch.setattr(release_module, "available_memory", lambda: GIB)
    monkeypatch.setattr(release_module, "load_images", tripwire)
    return loaded


def _run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _build(out, options: dict):
    args = [item for option, value in {**TINY, **options}.items() for item in (option, value)]
    return _run("challenge", "build", *args, "--test-release", "--out", out)


def _assert_refused(result, message: str):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0]


@pytest.mark.parametrize("options, message", list(BAD_BUILDS.values()), ids=list(BAD_BUILDS))
def test_bad_build_option_is_one_line_before_any_work(tmp_path, small_machine, options, message):
    result = _build(tmp_path / "out", options)
    _assert_refused(result, message)
    assert small_machine == []
    assert list(tmp_path.iterdir()) == []  # neither the release nor a temporary sibling


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 74.5 GiB for an array with shape (8, 100000, 100000)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
    ],
    ids=["numpy", "torch"],
)
def test_a_source_running_out_of_memory_is_one_line(tmp_path, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(release_module, "load_images", out_of_memory)
    result = _build(tmp_path / "out", {"--image-size": 4000, "--patch-size": 1000, "--n": 2})
    _assert_refused(result, "loading 2 images of 4000x4000 pixels ran out of memory")
    assert list(tmp_path.iterdir()) == []


def test_another_runtime_error_while_loading_is_not_called_out_of_memory(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(release_module, "load_images", broken)
    result = _build(tmp_path / "out", {})
    assert isinstance(result.exception, RuntimeError) and "out of memory" not in result.output


@pytest.mark.parametrize("overlap", [float("nan"), float("inf"), -float("inf")])
def test_plan_refuses_an_overlap_that_is_not_a_finite_fraction(overlap):
    with pytest.raises(NcbenchError, match="--overlap must leave"):
        BuildPlan.for_task("link", 32, sites=2, overlap=overlap)


def test_memory_estimate_counts_the_least_a_build_holds(monkeypatch):
    """A full-size nc47 build of 10,000 images needs about 2.3 GB by the estimate: not refused at 4 GiB."""
    monkeypatch.setattr(release_module, "available_memory", lambda: 4 * GIB)
    _check_memory(resolve_config("nc47"), BuildPlan.for_task("reid", 10_000))


@pytest.fixture
def folder(tmp_path):
    return png_folder(tmp_path / "images", 2, 16)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", -1, "--splits", "0.5,0.25,0.25"], "-1 is not in the range x>=0"),
        (["--splits", "nan,0.5,0.5"], "split fraction of 'train' must lie in [0, 1], got nan"),
        (["--splits", "train=inf"], "split fraction of 'train' must lie in [0, 1], got inf"),
        (["--splits", "0.5,0.5,0.5"], "split fractions must sum to 1, got 1.5"),
    ],
    ids=["seed -1", "nan fraction", "inf fraction", "fractions over 1"],
)
def test_bad_manifest_option_is_one_line_before_hashing(folder, tmp_path, options, message):
    out = tmp_path / "manifest.csv"
    result = _run("challenge", "manifest", folder, "--out", out, "--name", "x", *options)
    _assert_refused(result, message)  # one line: no "hashing images" progress before it
    assert not out.exists()
