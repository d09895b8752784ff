"""The encoder against docs/tasks.md#encoder, written out layer by layer with torch.nn modules."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import encode_all
from torch import nn

from ncbench import hardware
from ncbench.challenge.encoders import (
    PRESETS,
    Encoder,
    exact_linear,
    key_tensor_names,
    resolve_config,
    sample_key,
    sample_permutations,
)
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.errors import NcbenchError

TINY = dict(width=64, image_size=32, patch_size=8, bn_batch=6)


class ReferenceNeuraCrypt(nn.Module):
    """docs/tasks.md#encoder as the published code writes it: Conv2d stem, conv + BatchNorm blocks, pos, Linear."""

    def __init__(self, config):
        super().__init__()
        d, p = config.width, config.patch_size
        self.config = config
        self.stem = nn.Conv2d(1, d, kernel_size=p, stride=p)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, d, 1), nn.BatchNorm2d(d, affine=False, track_running_stats=False), nn.ReLU())
            for _ in range(config.depth)
        )
        self.pos = nn.Parameter(torch.zeros(config.n_patches, d))
        self.mix = nn.Linear(d, d)

    def load_key(self, key):
        c = self.config
        with torch.no_grad():
            self.stem.weight.copy_(key["stem.weight"].reshape(c.width, 1, c.patch_size, c.patch_size))
            self.stem.bias.copy_(key["stem.bias"])
            for k, block in enumerate(self.blocks):
                block[0].weight.copy_(key[f"blocks.{k}.weight"][:, :, None, None])
                block[0].bias.copy_(key[f"blocks.{k}.bias"])
            if c.mix:
                self.pos.copy_(key["pos"])
                self.mix.weight.copy_(key["mix.weight"])
                self.mix.bias.copy_(key["mix.bias"])

    def forward(self, images, perms):
        x = (images.float()[:, None] - 43.9) / 63.2
        x = self.stem(x)
        if self.config.stem_relu:
            x = torch.relu(x)
        for block in self.blocks:
            x = block(x)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), row-major patches
        if self.config.mix:
            x = self.mix(torch.relu(x + self.pos))
        # One randperm per image, applied in a Python loop as the original export did.
        return torch.stack([x[b, perms[b]] for b in range(len(x))])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_encoder_equals_layer_by_layer_reference(preset, tiny_images):
    config = resolve_config(preset, **TINY, depth=2 if PRESETS[preset].depth else 0)
    key = sample_key(config, seed=3)
    perms = sample_permutations(config, 3, 6)
    reference = ReferenceNeuraCrypt(config)
    reference.load_key(key)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tiny_images[:6]), torch.from_numpy(perms.astype(np.int64))).numpy()
    got = encode_all(Encoder(config, key), tiny_images[:6], perms)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_encoding_depends_on_batch_companions(tiny_images):
    config = resolve_config("nc7", **TINY)
    encoder = Encoder.from_seed(config, 5)
    alone = encoder.encode_batch(torch.from_numpy(tiny_images[:6]))
    companions = np.concatenate([tiny_images[:1], tiny_images[6:11]])
    changed = encoder.encode_batch(torch.from_numpy(companions))
    assert not torch.allclose(alone[0], changed[0], atol=1e-3)


def test_encoding_is_reproduced_exactly_from_seed_config_and_batch(tiny_images):
    config = resolve_config("nc7", **TINY)
    perms = sample_permutations(config, 11, 12)
    first = encode_all(Encoder.from_seed(config, 11), tiny_images, perms)
    again = encode_all(Encoder.from_seed(config, 11), tiny_images, sample_permutations(config, 11, 12))
    other_key = encode_all(Encoder.from_seed(config, 12), tiny_images, perms)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other_key)


def _linear_operands(rows: int, inner: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.relu(torch.randn(rows, inner, generator=generator))
    weight_t = (torch.rand(inner, width, generator=generator) * 2 - 1) / inner**0.5
    return values, weight_t, (torch.rand(width, generator=generator) * 2 - 1) / inner**0.5


@pytest.mark.parametrize("inner", [256, 2048])
def test_exact_products_are_as_close_as_float32_and_the_same_bits_in_any_summation_order(inner):
    values, weight_t, bias = _linear_operands(300, inner, 96)
    exact = exact_linear(values, weight_t, bias)
    truth = values.double() @ weight_t.double() + bias.double()
    error = (exact.double() - truth).square().mean().sqrt() / truth.square().mean().sqrt()
    assert error < 2e-6  # float32's own product: about 2.5e-7 here; float16 storage: 2.4e-4
    # Summed in the reverse order, in other row blocks: a float32 product changes its last bits.
    reversed_sum = exact_linear(values.flip(1), weight_t.flip(0), bias)
    assert torch.equal(reversed_sum, exact)
    assert torch.equal(exact_linear(values[150:], weight_t, bias), exact[150:])
    assert not torch.equal(values.flip(1) @ weight_t.flip(0) + bias, values @ weight_t + bias)


def test_exact_products_keep_zero_rows_and_refuse_a_width_beyond_float64():
    values, weight_t, bias = _linear_operands(4, 64, 8)
    values[1] = 0
    assert torch.equal(exact_linear(values, weight_t, bias)[1], bias)
    with pytest.raises(NcbenchError, match="too large"):
        exact_linear(torch.zeros(1, 2**22), torch.zeros(2**22, 1), torch.zeros(1))


def test_fp32_as_asked_is_exact_and_fp32_resolved_from_auto_is_the_fast_product(cpu_probe, tiny_images):
    cpu_probe({"avx2"}, bf16_fast=False)
    config = resolve_config("nc7", **TINY)
    asked, resolved = Encoder.from_seed(config, 4), Encoder.from_seed(dataclasses.replace(config, precision="auto"), 4)
    assert asked.exact and not resolved.exact and resolved.config.precision == "fp32"
    np.testing.assert_allclose(
        encode_all(resolved, tiny_images, None), encode_all(asked, tiny_images, None), rtol=1e-4, atol=1e-4
    )


def test_batchnorm_batches_are_consecutive_chunks_of_bn_batch(tiny_images):
    config = resolve_config("nc7", **TINY)
    encoder = Encoder.from_seed(config, 2)
    streamed = encode_all(encoder, tiny_images, None)
    second_batch = encoder.encode_batch(torch.from_numpy(tiny_images[6:12])).numpy()
    assert np.array_equal(streamed[6:12], second_batch)


def test_encode_stream_holds_no_batch_once_the_consumer_drops_it(tiny_images):
    # Peak memory of a build must not grow with N: the generator may not keep batch k alive
    # while it computes batch k + 1 (each full-size batch is 512 MB).
    encoder = Encoder.from_seed(resolve_config("nc7", **TINY), 2)
    encode_batch, alive_while_encoding = encoder.encode_batch, []

    def watched(*args):
        if refs:
            alive_while_encoding.append(refs[-1]() is not None)
        return encode_batch(*args)

    encoder.encode_batch, refs = watched, []
    for _, encoded in encoder.encode_stream(tiny_images, None):
        refs.append(weakref.ref(encoded))
        del encoded
    assert alive_while_encoding == [False]  # two batches of 6 in tiny_images


@pytest.mark.parametrize(
    "preset, depth, mix, shuffle, stem_relu",
    [
        ("linear", 0, False, False, False),
        ("nc3-noshuffle", 0, True, False, True),
        ("nc3", 0, True, True, True),
        ("nc7", 4, True, True, True),
        ("nc47", 44, True, True, True),
    ],
)
def test_preset_structure_matches_the_table(preset, depth, mix, shuffle, stem_relu):
    config = PRESETS[preset]
    assert (config.depth, config.mix, config.shuffle, config.stem_relu) == (depth, mix, shuffle, stem_relu)
    assert (config.width, config.image_size, config.patch_size, config.n_patches) == (2048, 256, 16, 256)
    names = key_tensor_names(config)
    assert sum(n.startswith("blocks.") for n in names) == 2 * depth
    assert ("pos" in names) == mix


def test_key_uses_pytorch_default_init_bounds():
    config = resolve_config("nc7", width=256)
    key = sample_key(config, 0)
    assert key["stem.weight"].abs().max() <= 1 / 16  # fan_in 16*16
    assert key["blocks.0.weight"].abs().max() <= 1 / 16  # fan_in 256
    assert key["blocks.0.weight"].abs().max() > 0.99 / 16
    assert abs(float(key["pos"].std()) - 1) < 0.01


def test_unshuffled_presets_keep_row_major_patch_order(tiny_images):
    config = resolve_config("nc3-noshuffle", **TINY)
    perms = sample_permutations(config, 0, 4)
    assert np.array_equal(perms, np.tile(np.arange(config.n_patches), (4, 1)))


def test_shuffle_is_a_fresh_permutation_per_image():
    perms = sample_permutations(PRESETS["nc7"], 0, 50)
    assert all(np.array_equal(np.sort(p), np.arange(256)) for p in perms)
    assert len({p.tobytes() for p in perms}) == 50


def test_bf16_precision_stays_close_to_fp32(tiny_images):
    config = resolve_config("nc7", **TINY)
    fp32 = encode_all(Encoder.from_seed(config, 4), tiny_images, None)
    bf16 = encode_all(Encoder.from_seed(dataclasses.replace(config, precision="bf16"), 4), tiny_images, None)
    assert np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1] > 0.99


def test_bf16_activations_stay_close_to_fp32_and_are_off_by_default(tiny_images):
    config = dataclasses.replace(resolve_config("nc7", **TINY), precision="bf16")
    key = sample_key(config, 4)
    assert Encoder(config, key).encode_batch(torch.from_numpy(tiny_images[:6])).dtype == torch.float32
    fast = Encoder(config, key, bf16_activations=True)
    assert fast.encode_batch(torch.from_numpy(tiny_images[:6])).dtype == torch.bfloat16
    fp32 = encode_all(Encoder(dataclasses.replace(config, precision="fp32"), key), tiny_images, None)
    bf16 = encode_all(fast, tiny_images, None)
    assert np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1] > 0.99


def test_bad_overrides_are_refused():
    with pytest.raises(NcbenchError, match="unknown preset"):
        resolve_config("nc9")
    with pytest.raises(NcbenchError, match="multiple of patch_size"):
        resolve_config("nc7", image_size=30, patch_size=16)


# -- precision follows the hardware -------------------------------------------------------------


@pytest.fixture
def cpu_probe(monkeypatch):
    """Pretend to be a CPU with the given /proc/cpuinfo flags whose bf16 matmul timing says
    ``bf16_fast``; returns a list that records every calibration run."""
    calibrations = []

    def pretend(flags, bf16_fast):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(hardware, "bf16_matmul_is_faster", lambda: calibrations.append(1) or bf16_fast)
        hardware.cpu_has_fast_bf16.cache_clear()
        return calibrations

    yield pretend
    hardware.cpu_has_fast_bf16.cache_clear()


def test_auto_precision_is_fp32_on_a_cpu_without_bf16_flags(cpu_probe):
    calibrations = cpu_probe({"avx2", "fma"}, bf16_fast=True)
    assert resolve_config("nc7", precision="auto").for_device("cpu").precision == "fp32"
    assert calibrations == []  # no flag, nothing to time


@pytest.mark.parametrize("flag", sorted(hardware.BF16_CPU_FLAGS))
def test_auto_precision_is_bf16_when_the_cpu_multiplies_bf16_natively(cpu_probe, flag):
    cpu_probe({"avx2", flag}, bf16_fast=True)
    assert resolve_config("nc7", precision="auto").for_device("cpu").precision == "bf16"


def test_auto_precision_is_fp32_when_a_flagged_cpu_still_emulates_bf16(cpu_probe):
    # e.g. oneDNN capped below the CPU (ONEDNN_MAX_CPU_ISA=AVX2): the timing overrules the flag
    cpu_probe({"avx512_bf16"}, bf16_fast=False)
    assert resolve_config("nc7", precision="auto").for_device("cpu").precision == "fp32"


def test_cpu_probe_runs_once_per_process(cpu_probe):
    calibrations = cpu_probe({"amx_bf16"}, bf16_fast=True)
    for _ in range(3):
        resolve_config("nc7", precision="auto").for_device("cpu")
    assert calibrations == [1]


def test_bf16_timing_keeps_its_verdict_while_another_thread_holds_a_core():
    """The release's prefetch thread copies pages on one of two cores while the attack's first
    encoder resolves ``auto``: the timing must not read that wait as slow bf16."""
    quiet = hardware.bf16_matmul_is_faster()
    threads = torch.get_num_threads()
    stop = threading.Event()

    def copy_pages() -> None:  # numpy copies release the GIL, as the prefetch's reads do
        source, target = np.ones(1 << 23), np.empty(1 << 23)
        while not stop.is_set():
            np.copyto(target, source)

    busy = threading.Thread(target=copy_pages, daemon=True)
    busy.start()
    try:
        verdicts = [hardware.bf16_matmul_is_faster() for _ in range(8)]
    finally:
        stop.set()
        busy.join()
    assert verdicts == [quiet] * 8
    assert torch.get_num_threads() == threads


def test_bf16_timing_uses_wall_time_where_thread_time_is_coarse(monkeypatch):
    """Windows counts a thread's CPU time in 15.6 ms steps: every product would time as 0."""
    monkeypatch.setattr(hardware.time, "get_clock_info", lambda name: types.SimpleNamespace(resolution=0.0156))
    monkeypatch.setattr(hardware.time, "thread_time", lambda: pytest.fail("coarse thread time was used"))
    assert hardware.bf16_matmul_is_faster() in (True, False)


def test_explicit_precision_is_never_overridden(cpu_probe):
    cpu_probe({"avx2"}, bf16_fast=False)
    assert resolve_config("nc7", precision="bf16").for_device("cpu").precision == "bf16"


@pytest.mark.parametrize("bf16_fast, chosen", [(False, "fp32"), (True, "bf16")])
def test_auto_encoder_output_equals_the_chosen_precision(cpu_probe, tiny_images, bf16_fast, chosen):
    cpu_probe({"avx512_bf16"}, bf16_fast=bf16_fast)
    config = resolve_config("nc7", **TINY)
    auto = Encoder.from_seed(dataclasses.replace(config, precision="auto"), 4)
    explicit = Encoder.from_seed(dataclasses.replace(config, precision=chosen), 4)
    assert auto.config.precision == chosen
    # fp32 resolved from auto keeps the BLAS's products; fp32 as asked sums them exactly.
    tolerance = 1e-4 if chosen == "fp32" else 0
    np.testing.assert_allclose(
        encode_all(auto, tiny_images, None), encode_all(explicit, tiny_images, None), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("bf16_fast, chosen", [(False, "fp32"), (True, "bf16")])
def test_release_records_the_resolved_precision_never_auto(cpu_probe, tmp_path, bf16_fast, chosen):
    cpu_probe({"avx512_bf16"}, bf16_fast=bf16_fast)
    config = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8, precision="auto")
    out = build_release(
        tmp_path / "r",
        config=config,
        plan=BuildPlan.for_task("reid", 8),
        source="phantom",
        seed=1,
        test_release=True,
        device="cpu",
    )
    with open_release(out) as release, open_key(out) as key:
        assert release.config.precision == key.config.precision == chosen


def test_cli_build_defaults_to_fp32_even_where_bf16_is_fast(cpu_probe, tmp_path):
    cpu_probe({"amx_bf16"}, bf16_fast=True)
    result = CliRunner().invoke(
        main,
        [
            "challenge",
            "build",
            "--preset",
            "nc3",
            "--n",
            "4",
            "--source",
            "phantom",
            "--seed",
            "3",
            "--test-release",
            "--width",
            "16",
            "--image-size",
            "32",
            "--patch-size",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    with open_release(tmp_path / "r") as release:
        assert release.config.precision == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fp32_equals_cpu(tiny_images):
    config = resolve_config("nc7", **TINY)
    cpu = encode_all(Encoder.from_seed(config, 1), tiny_images, None)
    gpu = encode_all(Encoder.from_seed(config, 1, device="cuda"), tiny_images, None)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)


# -- the same bytes on any CPU ---------------------------------------------------------------------


def _numpy_targets(*, keep_avx2: bool) -> str:
    """numpy's optional SIMD targets that this CPU runs, as NPY_DISABLE_CPU_FEATURES names: all of
    them (numpy then runs its baseline, SSE4.2 here) or only those beyond AVX2 (X86_V4,
    AVX512_*: what an AVX2-only CPU runs)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    on = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    return " ".join(name for name in on if not keep_avx2 or "512" in name or name == "X86_V4")


# What a CPU without AVX, and one with AVX2 only, would compute: numpy's SIMD loops, the C
# library's FMA and AVX2 variants (glibc.cpu.hwcaps), torch's vectorised kernels
# (ATEN_CPU_CAPABILITY), oneDNN's and MKL's instruction sets, and one thread or two.
CPU_ENVIRONMENTS = {
    "baseline": {
        "NPY_DISABLE_CPU_FEATURES": _numpy_targets(keep_avx2=False),
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F",
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "OMP_NUM_THREADS": "1",
    },
    "avx2": {
        "NPY_DISABLE_CPU_FEATURES": _numpy_targets(keep_avx2=True),
        "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OMP_NUM_THREADS": "2",
    },
    "native": {},
}

# In one interpreter per CPU environment: 64 phantom images of 64 pixels, eight noise images in
# [0, 1] (as windowed DICOM values are) resized as folder and manifest sources resize, one
# evaluation release as the verified track builds it (its recipe, build_evaluation) and one
# two-site link release with second acquisitions (reacquire's noise); then their digests.
_BUILD_ALL = """
import hashlib, json, sys
from pathlib import Path
import numpy as np
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.images import resized_uint8
from ncbench.challenge.phantom import render_phantoms
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.leaderboard.verified.runs import Recipe, build_evaluation
out, n, size, width = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
digest = lambda data: hashlib.sha256(data).hexdigest()
images, labels = render_phantoms(64, seed=5, image_size=64)
noise = np.random.default_rng(0).random((8, 390, 320), dtype=np.float32)
found = {
    "phantom": digest(images.tobytes() + labels.tobytes()),
    "resized": digest(np.stack([resized_uint8(unit, 256) for unit in noise]).tobytes()),
}
config = resolve_config("nc7", width=width, image_size=size, patch_size=8, bn_batch=16)
build_evaluation(out / "evaluation", Recipe(config.to_json(), "reid", n, 0, 0, 0, "phantom", 1700000000), "ab" * 32)
plan = BuildPlan.for_task("link", n // 2, sites=2, overlap=0.25, overlap_kind="patient")
build_release(out / "link", config=config, plan=plan, source="phantom", seed="cd" * 32, device="cpu")
for name in ("evaluation", "link"):
    for part in ("public/release.h5", "private/key.h5"):
        found[f"{name}/{part}"] = digest((out / name / part).read_bytes())
print(json.dumps(found))
"""


def _digests_per_cpu(folder: Path, *, n: int, image_size: int, width: int) -> dict[str, dict]:
    digests = {}
    for name, env in CPU_ENVIRONMENTS.items():
        built = subprocess.run(
            [sys.executable, "-c", _BUILD_ALL, str(folder / name), str(n), str(image_size), str(width)],
            capture_output=True,
            text=True,
            env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000", **env},
        )
        assert built.returncode == 0, built.stderr
        digests[name] = json.loads(built.stdout.splitlines()[-1])
    return digests


@pytest.fixture(scope="module")
def per_cpu(tmp_path_factory) -> dict[str, dict]:
    return _digests_per_cpu(tmp_path_factory.mktemp("per-cpu"), n=32, image_size=64, width=64)


def _parts(digests: dict[str, dict], *names: str) -> dict[str, dict]:
    return {cpu: {name: found[name] for name in names} for cpu, found in digests.items()}


RELEASE_PARTS = [
    f"{name}/{part}" for name in ("evaluation", "link") for part in ("public/release.h5", "private/key.h5")
]


def test_an_fp32_release_is_the_same_bytes_whatever_the_cpu_computes_with(per_cpu):
    releases = _parts(per_cpu, *RELEASE_PARTS)
    assert releases["baseline"] == releases["avx2"] == releases["native"], releases


def test_source_images_are_the_same_bytes_whatever_simd_numpy_and_torch_dispatch(per_cpu):
    """numpy's exp, sin, cos, arctan2 and power differ in the last bit between its AVX-512, AVX2
    and baseline loops, and torch's float32 antialiased resizing between its vectorised and
    scalar kernels; the phantom source uses none of the former, and decoded files are resized in
    float64."""
    images = _parts(per_cpu, "phantom", "resized")
    assert images["baseline"] == images["avx2"] == images["native"], images


@pytest.mark.slow
def test_a_larger_release_is_the_same_bytes_whatever_the_cpu_computes_with(tmp_path):
    releases = _parts(_digests_per_cpu(tmp_path, n=512, image_size=128, width=256), *RELEASE_PARTS)
    assert releases["baseline"] == releases["avx2"] == releases["native"], releases
