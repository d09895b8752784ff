"""What every image source returns (:class:`ImageSet`), and the decoding of image files (PNG, JPEG,
DICOM) to resized grayscale that the folder, manifest and sample sources share."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ncbench.data_manifest.folders import DICOM_SUFFIXES
from ncbench.errors import NcbenchError


@dataclass(frozen=True)
class ImageSet:
    """Images plus what may be published about them.

    images: (N, S, S) uint8; ids: N stable source-level ids (never local paths);
    labels: (N, K) int8 with 1 / 0 and -1 for unknown; label_names: K names;
    description: one public sentence on what the images are (recorded in the release).
    """

    images: np.ndarray
    ids: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.ids)


def _dicom_to_unit(dataset) -> np.ndarray:
    """Stored DICOM pixels -> (H, W) float32 in [0, 1], bright = dense (bone white).

    Applies the modality rescale, inverts MONOCHROME1 (where low values are white) and windows
    to the 0.5 / 99.5 percentiles, which drops burnt-in markers and collimator edges.
    """
    from pydicom.pixels import apply_modality_lut

    pixels = dataset.pixel_array
    if int(getattr(dataset, "SamplesPerPixel", 1)) == 3:
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif pixels.ndim != 2:
        raise ValueError(f"{pixels.shape[0]} frames; only single-frame images are supported")
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = -values
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / max(float(high - low), 1e-12), 0.0, 1.0).astype(np.float32)


def _pillow_to_unit(image) -> np.ndarray:
    """A Pillow image -> (H, W) float32 in [0, 1]; 16-bit grayscale is scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        return (np.clip(values, 0, 65535) / 65535.0 * 255.0).round().astype(np.float32) / 255.0
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


IN_MEMORY_FILE = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def decode_image(content: bytes, name: str) -> np.ndarray:
    """Encoded file bytes -> (H, W) float32 grayscale in [0, 1].

    DICOM (by suffix or preamble) goes through pydicom, anything else through Pillow.
    Raises NcbenchError naming ``name`` when the file cannot be decoded.
    """
    try:
        if Path(name).suffix.lower() in DICOM_SUFFIXES or content[128:132] == b"DICM":
            import pydicom

            return _dicom_to_unit(pydicom.dcmread(io.BytesIO(content), force=True))
        from PIL import Image

        with Image.open(io.BytesIO(content)) as image:
            image.load()
            return _pillow_to_unit(image)
    except NcbenchError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file
        # Pillow names the in-memory file it was given ("<_io.BytesIO object at 0x7f...>"): not for users.
        reason = " ".join(IN_MEMORY_FILE.sub("", str(error)).split()) or type(error).__name__
        raise NcbenchError(f"cannot read image {name}: {reason}") from None


def resize_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) float in [0, 1] -> (B, size, size): bilinear with antialias, aspect not kept."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]


def to_uint8(unit: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 on 0..255 (rounded, clipped)."""
    unit = torch.as_tensor(unit)
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def decode_resized(content: bytes, name: str, size: int) -> np.ndarray:
    return resized_uint8(decode_image(content, name), size)


def resized_uint8(unit: np.ndarray, size: int) -> np.ndarray:
    """(H, W) floats in [0, 1] -> (size, size) uint8, resized in float64: in float32, torch's
    vectorised and scalar resampling kernels round windowed DICOM values to different grey levels
    now and then; in float64 their last-bit differences stay far from a grey level's edge."""
    return to_uint8(resize_unit(torch.from_numpy(np.asarray(unit, dtype=np.float64))[None], size)[0])


def read_image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise NcbenchError(f"cannot read image {path}: {error.strerror or error}") from None
