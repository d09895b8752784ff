"""The NeuraCrypt encoder (Yala et al. 2021) and its named presets (docs/tasks.md#encoder).

Forward pass of the reference architecture, per batch of ``bn_batch`` images:

1. stem: Conv2d(1 -> D, kernel = stride = patch) with bias, then ReLU (no ReLU for ``linear``);
2. ``depth`` blocks of 1x1 Conv2d(D -> D) with bias, BatchNorm2d(D) on the current batch's
   statistics (affine 1 / 0), ReLU;
3. flatten to (B, P, D) in row-major patch order;
4. add the shared positional embedding ``pos`` (P, D) ~ N(0, 1);
5. ReLU, then Linear(D -> D) with bias (signed outputs);
6. a fresh random permutation of each image's P patch rows.

Everything here is written as matrix products on (B * P, D) rows: a 1x1 convolution is a matmul,
and the stem is a matmul on unfolded patches, so one batch is a handful of large GEMMs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# The presets and EncoderConfig live in the torch-free config module; imported here for callers.
from ncbench.challenge.config import (  # noqa: F401
    OVERRIDABLE,
    PRECISIONS,
    PRESETS,
    STORAGE_DTYPES,
    EncoderConfig,
    key_tensor_names,
    resolve_config,
)
from ncbench.errors import NcbenchError
from ncbench.hardware import pick_device as pick_device  # re-exported: the CLI and the builder import it here

PIXEL_MEAN = 43.9  # input normalisation of the published code, on the 0-255 scale
PIXEL_STD = 63.2
BN_EPS = 1e-5  # torch.nn.BatchNorm2d default


def sample_key(config: EncoderConfig, seed: int | str) -> dict[str, torch.Tensor]:
    """Draw every weight of the encoder from ``seed`` (float32, CPU; see :func:`derive_seed`).

    PyTorch's default Conv2d / Linear init is uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    weights and biases; ``pos`` is N(0, 1). Stem weights are stored as (D, patch*patch), the
    flattened Conv2d kernel.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, "weights"))
    width, patch_dim = config.width, config.patch_dim

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    key = {"stem.weight": uniform((width, patch_dim), patch_dim), "stem.bias": uniform((width,), patch_dim)}
    for k in range(config.depth):
        key[f"blocks.{k}.weight"] = uniform((width, width), width)
        key[f"blocks.{k}.bias"] = uniform((width,), width)
    if config.mix:
        # numpy's ziggurat, not torch.randn: torch's vectorised Box-Muller rounds differently on
        # each CPU (ATEN_CPU_CAPABILITY), and a key must be the same bytes everywhere.
        normal = np.random.default_rng(derive_seed(seed, "pos"))
        key["pos"] = torch.from_numpy(normal.standard_normal((config.n_patches, width), dtype=np.float32))
        key["mix.weight"] = uniform((width, width), width)
        key["mix.bias"] = uniform((width,), width)
    return key


def sample_permutations(config: EncoderConfig, seed: int | str, n: int, purpose: str = "permutations") -> np.ndarray:
    """Per-image patch permutations (n, P) int16: row r of an encoding holds patch ``perm[r]``.

    Identity rows when the preset does not shuffle. Drawn in one batched call.
    """
    n_patches = config.n_patches
    if not config.shuffle:
        return np.broadcast_to(np.arange(n_patches, dtype=np.int16), (n, n_patches)).copy()
    generator = torch.Generator().manual_seed(derive_seed(seed, purpose))
    return torch.argsort(torch.rand((n, n_patches), generator=generator), dim=1).numpy().astype(np.int16)


def derive_seed(seed: int | str, purpose: str) -> int:
    """An independent 63-bit seed for one purpose, so adding a purpose never shifts another.

    ``seed`` is hashed as text: a release's secret seed as lowercase hex (docs/format.md#seed-derivation),
    a test or baseline seed as a decimal integer.
    """
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def images_to_patches(images: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """(B, S, S) uint8 images -> (B, P, patch*patch) normalised float32 patches, row-major."""
    batch, size = images.shape[0], config.image_size
    if images.shape[1:] != (size, size):
        raise NcbenchError(f"images are {tuple(images.shape[1:])}, the encoder expects {size}x{size}")
    grid, patch = size // config.patch_size, config.patch_size
    # Rearranged as uint8, then normalised in place: the same values, a third of the time.
    patches = images.reshape(batch, grid, patch, grid, patch).permute(0, 1, 3, 2, 4)
    return patches.reshape(batch, grid * grid, patch * patch).float().sub_(PIXEL_MEAN).div_(PIXEL_STD)


MEAN_CHUNK_ROWS = 1024  # a float64 chunk stays in cache: as fast as a float32 mean here
# Exact products (precision fp32): each weight column is rounded to EXACT_WEIGHT_BITS bits below the
# power of two above its largest entry, each input row to as many bits as float64 then has room for.
EXACT_WEIGHT_BITS = 20
EXACT_ROWS = 8192  # input rows per float64 product: 128 MB at width 2,048


def _power_of_two_steps(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """float64 steps, one per slice along ``dim``: the power of two at or above the slice's largest
    |value|, divided by 2^bits, so that each value is at most 2^bits steps. Only exact operations:
    top / mantissa is exactly 2^exponent (an all-zero slice takes the step of 2^-1000)."""
    top = values.abs().amax(dim=dim, keepdim=True).double().clamp_min_(2.0**-1000)
    mantissa, _ = torch.frexp(top)
    return top.div_(mantissa).mul_(2.0**-bits)


def exact_linear(rows: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(R, K) float32 rows @ (K, D) float32 weight_t + bias, the same bits whatever the BLAS and the instruction set.

    A float32 matrix product sums in an order, and with or without fused multiply-adds, that
    depend on the BLAS and the instruction set (MKL gives other bits with AVX2 than with SSE4, and
    conditional reproducibility costs 4x); one bit then moves a whole BatchNorm batch. Here both
    operands are rounded onto grids of powers of two (weights per output column to
    EXACT_WEIGHT_BITS bits, rows to 53 - EXACT_WEIGHT_BITS - ceil(log2 K) bits: 22 at K = 2,048),
    so every partial sum of the float64 product is an integer below 2^53 times one power of two:
    exact in any order. Scaling back is exact; adding the bias and the cast round once each.
    Error against float64: about 3 times float32's (rms relative 7e-7 at K = 2,048), far under
    float16 storage; about 3x a float32 product's time."""
    inner = rows.shape[1]
    row_bits = 53 - EXACT_WEIGHT_BITS - max(inner - 1, 1).bit_length()
    if row_bits < 12:
        raise NcbenchError(f"width {inner} is too large for exact float32 products")
    weight_steps = _power_of_two_steps(weight_t, EXACT_WEIGHT_BITS, 0)
    weight = weight_t.double().div_(weight_steps).round_()
    out = torch.empty(rows.shape[0], weight_t.shape[1], device=rows.device)
    for start in range(0, rows.shape[0], EXACT_ROWS):
        block = rows[start : start + EXACT_ROWS]
        steps = _power_of_two_steps(block, row_bits, 1)
        product = block.double().div_(steps).round_() @ weight
        out[start : start + EXACT_ROWS] = product.mul_(steps).mul_(weight_steps).add_(bias).float()
    return out


def _column_mean(rows: torch.Tensor) -> torch.Tensor:
    """(R, D) float32 -> (D,) float32 mean over rows, accumulated in float64 chunk by chunk.

    A float32 reduction sums in an order that depends on the CPU's vector width
    (ATEN_CPU_CAPABILITY), so its last bits differ between CPUs; a float64 sum rounded to float32
    gives the same bytes on any of them, and chunks keep the float64 copy small."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], MEAN_CHUNK_ROWS):
        total += rows[start : start + MEAN_CHUNK_ROWS].sum(dim=0, dtype=torch.float64)
    return (total / rows.shape[0]).float()


class Encoder:
    """A keyed NeuraCrypt encoder on one device.

    ``encode_batch`` encodes exactly one BatchNorm batch; callers choose batch composition
    (``encode_stream`` uses consecutive chunks of ``config.bn_batch``).
    """

    def __init__(
        self,
        config: EncoderConfig,
        key: dict[str, torch.Tensor],
        device: str = "cpu",
        *,
        bf16_activations: bool = False,
    ):
        self.device = torch.device(device)
        # fp32 as asked (releases, their verification): exact products, the same bits anywhere.
        # fp32 that ``auto`` resolved to (an attacker's own encoder) keeps the BLAS's fast products.
        self.exact = config.precision == "fp32"
        self.config = config.for_device(self.device)
        self.key = {name: tensor.to(self.device, torch.float32) for name, tensor in key.items()}
        # Weights transposed (and cast for bf16) once, so every layer is ``rows @ weight_t + bias``.
        self._matmul_dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float32
        self._weight_t = {
            name: t.t().contiguous().to(self._matmul_dtype) for name, t in self.key.items() if name.endswith(".weight")
        }
        # An attacker's own key feeds statistics only: with bf16 products, bf16 activations save
        # two casts per layer and half the memory traffic of BatchNorm (512 images at width 512: 2.2 s, not 2.9 s).
        # Never for a release: its encodings are computed in fp32 or with fp32 activations.
        self._activation_dtype = self._matmul_dtype if bf16_activations else torch.float32
        # Biases and the positional embedding, added to activations, in their dtype (the same
        # tensors as ``key`` for fp32 activations).
        self._addends = {
            name: t.to(self._activation_dtype) for name, t in self.key.items() if not name.endswith(".weight")
        }

    @classmethod
    def from_seed(
        cls, config: EncoderConfig, seed: int | str, device: str = "cpu", *, bf16_activations: bool = False
    ) -> Encoder:
        return cls(config, sample_key(config, seed), device, bf16_activations=bf16_activations)

    def _linear(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        weight = self._weight_t[f"{name}.weight"]
        bias = self._addends[f"{name}.bias"]
        if self.exact:
            return exact_linear(rows, weight, bias)
        if self._matmul_dtype == self._activation_dtype:  # fp32 throughout, or bf16 throughout
            return torch.addmm(bias, rows.to(self._matmul_dtype), weight)
        return (rows.to(self._matmul_dtype) @ weight).float().add_(bias)

    def _batch_norm_relu(self, rows: torch.Tensor) -> torch.Tensor:
        """BatchNorm2d in training mode: per-channel mean and biased variance over the whole batch
        (all images, all positions); affine weight 1 and bias 0; then ReLU, in place."""
        if rows.dtype == torch.float32:
            # Two-pass mean / variance in place: torch.var_mean over dim 0 is 6x slower here.
            rows = rows.sub_(_column_mean(rows))
            var = _column_mean(rows.square())
        else:
            # bf16 sums accumulate in fp32 inside; asking for an fp32 result copies the batch first.
            rows = rows.sub_(rows.sum(0) / rows.shape[0])
            var = rows.square().sum(0).float() / rows.shape[0]
        return rows.mul_(torch.rsqrt(var + BN_EPS).to(rows.dtype)).relu_()

    @torch.no_grad()
    def encode_batch(self, images: torch.Tensor, perms: torch.Tensor | None = None) -> torch.Tensor:
        """Encode one batch.

        images: (B, S, S) uint8; perms: (B, P) int64 patch permutation per image or None for no
        shuffle. Returns (B, P, D) float32 (bf16 with ``bf16_activations``) where
        ``out[b, r] = unshuffled[b, perms[b, r]]``.
        """
        config = self.config
        patches = images_to_patches(images.to(self.device), config)
        batch, n_patches, _ = patches.shape
        rows = self._linear(patches.reshape(batch * n_patches, -1), "stem")
        if config.stem_relu:
            rows = torch.relu_(rows)
        for k in range(config.depth):
            rows = self._batch_norm_relu(self._linear(rows, f"blocks.{k}"))
        if config.mix:
            # In place: a batch of 256 full-width rows is 512 MB, and peak memory is a few of them.
            rows = rows.reshape(batch, n_patches, -1).add_(self._addends["pos"])
            rows = self._linear(torch.relu_(rows).reshape(batch * n_patches, -1), "mix")
        encoded = rows.reshape(batch, n_patches, -1)
        if perms is not None:
            index = perms.to(self.device, torch.int64).unsqueeze(-1).expand_as(encoded)
            encoded = torch.gather(encoded, 1, index)
        return encoded

    def encode_stream(self, images: np.ndarray, perms: np.ndarray | None, on_batch=None, on_images=None):
        """Yield (start, encoded (b, P, D) float32 on CPU) for consecutive BatchNorm batches.

        images: (N, S, S) uint8; perms: (N, P) or None. ``on_batch(b)`` is called after each batch,
        ``on_images(start, images)`` with each batch's (b, S, S) uint8 images as they are read.
        Holds no reference to a batch once it is yielded, so a consumer that drops its own
        (``del``) keeps peak memory at one batch whatever N is.
        """
        size = self.config.bn_batch
        for start in range(0, len(images), size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + size]))
            if on_images is not None:
                on_images(start, chunk)
            chunk_perms = None if perms is None else torch.from_numpy(perms[start : start + size].astype(np.int64))
            encoded = self.encode_batch(chunk, chunk_perms).cpu()
            if on_batch is not None:
                on_batch(len(chunk))
            yield start, encoded
            del encoded
