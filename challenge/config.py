"""The public configuration of a challenge: the encoder presets and the tasks.

Plain data, no torch: the command line offers these choices without loading the encoder, and a
release records its resolved configuration (``EncoderConfig.to_json``). The encoder itself is in
:mod:`ncbench.challenge.encoders`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ncbench.errors import NcbenchError

TASKS = ("reid", "transfer", "invert", "link")
SITE_TASKS = ("reid", "link")  # tasks a release with several sites (keys) may have

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the hardware multiplies it natively
STORAGE_DTYPES = ("float16", "float32")
# The most a size (width, image or patch side, BatchNorm batch) or an image count of a build may be:
# far beyond any array a machine holds, far below the 2**63 where numpy's integers overflow.
MAX_SIZE = 2**31 - 1
MAX_PATCHES = 2**15 - 1  # patches per image: truth/patch_perm is int16 (docs/format.md#group-truth)


@dataclass(frozen=True)
class EncoderConfig:
    """The public, resolved configuration of an encoder (everything but the key)."""

    preset: str
    stem_relu: bool  # False only for ``linear``: the stem conv is the whole encoder
    depth: int  # number of 1x1 conv + BatchNorm + ReLU blocks
    mix: bool  # positional embedding + ReLU + final Linear
    shuffle: bool  # per-image random patch permutation
    width: int = 2048
    image_size: int = 256
    patch_size: int = 16
    bn_batch: int = 256  # the original challenge was exported in batches of 256
    dtype: str = "float16"  # storage dtype of released encodings
    precision: str = "fp32"  # compute precision: fp32, bf16 matmuls, or auto (see for_device)

    def __post_init__(self) -> None:
        for name in ("width", "image_size", "patch_size", "bn_batch"):
            value = getattr(self, name)
            if value < 1:
                raise NcbenchError(f"{name} must be positive, got {value}")
            if value > MAX_SIZE:
                raise NcbenchError(f"{name} must be at most {MAX_SIZE:,}, got {value}")
        if self.image_size % self.patch_size:
            raise NcbenchError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.n_patches > MAX_PATCHES:
            raise NcbenchError(
                f"image_size {self.image_size} and patch_size {self.patch_size} make {self.n_patches:,} patches "
                f"per image; patch permutations are stored as int16, which holds at most {MAX_PATCHES:,}"
            )
        if self.depth < 0:
            raise NcbenchError(f"depth must be >= 0, got {self.depth}")
        if self.dtype not in STORAGE_DTYPES:
            raise NcbenchError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise NcbenchError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2

    def for_device(self, device) -> EncoderConfig:
        """This configuration with ``precision = auto`` resolved for ``device``: bf16 where its
        matmuls pay off there (:func:`ncbench.hardware.fast_bf16`), else fp32. Releases record
        the resolved value, so a file always says which arithmetic made it."""
        from ncbench.hardware import fast_bf16  # measures the device with torch

        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision="bf16" if fast_bf16(device) else "fp32")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as error:
            raise NcbenchError(f"unreadable encoder configuration: {error}") from None


PRESETS: dict[str, EncoderConfig] = {
    "linear": EncoderConfig("linear", stem_relu=False, depth=0, mix=False, shuffle=False),
    "nc3-noshuffle": EncoderConfig("nc3-noshuffle", stem_relu=True, depth=0, mix=True, shuffle=False),
    "nc3": EncoderConfig("nc3", stem_relu=True, depth=0, mix=True, shuffle=True),
    "nc7": EncoderConfig("nc7", stem_relu=True, depth=4, mix=True, shuffle=True),
    "nc47": EncoderConfig("nc47", stem_relu=True, depth=44, mix=True, shuffle=True),
}
OVERRIDABLE = ("width", "image_size", "patch_size", "bn_batch", "dtype", "precision", "depth")


def resolve_config(preset: str, **overrides) -> EncoderConfig:
    """The preset's configuration with ``overrides`` (None values are ignored) applied."""
    if preset not in PRESETS:
        raise NcbenchError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise NcbenchError(f"unknown encoder override(s): {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **changes)


def key_tensor_names(config: EncoderConfig) -> list[str]:
    """Names of the key's tensors, in the order they are drawn from the key generator."""
    names = ["stem.weight", "stem.bias"]
    for k in range(config.depth):
        names += [f"blocks.{k}.weight", f"blocks.{k}.bias"]
    if config.mix:
        names += ["pos", "mix.weight", "mix.bias"]
    return names
