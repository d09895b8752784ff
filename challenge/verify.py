"""``ncbench challenge verify``: check a release directory against its checksums and its key.

With the key, the encodings are recomputed from the key tensors, the stored permutations, the
batch composition and the plaintexts, so any change to the release or key is found.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ncbench.challenge.encoders import Encoder
from ncbench.challenge.files import Key, Release, ReleaseLayout, key_file, open_key, open_release
from ncbench.challenge.release import OVERLAP_KINDS, read_sha256sums
from ncbench.errors import NcbenchError
from ncbench.h5io import sha256_file
from ncbench.progress import progress

# float16 storage keeps 11 significant bits; recomputation may round the other way.
RTOL = 2e-3
# The first ncbench version (major, minor) whose fp32 releases hold exact products, the same on every
# CPU; earlier ones hold their builder's float32 products (docs/tasks.md#precision-and-storage).
EXACT_PRODUCTS_SINCE = (0, 2)
EARLIER_PRODUCTS = (
    "; the release was written before ncbench 0.2.0, with float32 products that other CPUs round"
    " otherwise, which a deep encoder carries beyond the tolerance: recompute it on a CPU like its builder's"
)


def verify(release_dir: str | os.PathLike, key_path: str | os.PathLike | None = None) -> list[str]:
    """Return a list of problems (empty when the release checks out)."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise NcbenchError(f"{release_dir}: not a release directory")
    problems = _check_sums(ReleaseLayout(release_dir).public)
    with open_release(release_dir) as release:
        if key_path is None:
            return problems
        key_path = key_file(key_path)
        if (key_path.parent / "SHA256SUMS").is_file():
            problems += _check_sums(key_path.parent)
        with open_key(key_path) as key:
            problems += _check_against_key(release, key)
    return problems


def _check_sums(folder: Path) -> list[str]:
    problems = []
    for name, digest in read_sha256sums(folder).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in SHA256SUMS but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 does not match SHA256SUMS")
    return problems


def _check_against_key(release: Release, key: Key) -> list[str]:
    if key.challenge_id != release.challenge_id:
        return [f"key is for challenge {key.challenge_id}, release is {release.challenge_id}"]
    problems = []
    if key.commitment() != release.h5.attrs["key_commitment"]:
        problems.append("key commitment does not match the release (key or release altered)")
    if key.h5.attrs.get("release_sha256") != sha256_file(release.path):
        problems.append("release.h5 is not the file this key was issued with")
    if key.config != release.config:
        problems.append("encoder configuration differs between key and release")
        return problems
    sites = release.sites
    encoders = [
        Encoder(key.config, {k: _tensor(v) for k, v in key.tensors(site).items()}) for site in range(release.n_sites)
    ]
    if release.task == "reid":
        plain = release.plain_images[key.read("truth/plain_index")]
    else:
        plain = key.read("truth/images")
    batch = key.read("truth/batch")
    if any(len(np.unique(sites[batch == b])) > 1 for b in np.unique(batch)):
        problems.append("truth/batch mixes sites: a BatchNorm batch holds one site's images")
        return problems
    note = EARLIER_PRODUCTS if key.config.precision == "fp32" and _before_exact_products(release) else ""
    problems += _compare(
        encoders, sites, plain, key.read("truth/patch_perm"), batch, release.encoded, "encoded/data", note
    )
    if release.task == "link":
        kind = str(key.h5["truth/link_pairs"].attrs.get("overlap_kind", ""))
        problems += _check_link_pairs(key.read("truth/link_pairs"), sites, plain, kind)
    if release.task == "transfer":
        n_targets = len(release.target_ids)
        problems += _compare(
            encoders,
            np.zeros(n_targets, np.int64),
            release.target_images,
            key.read("truth/target_patch_perm"),
            np.arange(n_targets) // key.config.bn_batch,
            key.h5["truth/target_encodings"],
            "truth/target_encodings",
            note,
        )
    if release.task == "invert":
        rows = [release.encoded_ids.index(i) for i in release.pair_encoded_ids]
        if not np.array_equal(key.read("truth/images")[rows], release.plain_images):
            problems.append("known-pair plaintexts differ from the key's truth images")
    return problems


def _before_exact_products(release: Release) -> bool:
    """Whether the release says an ncbench before :data:`EXACT_PRODUCTS_SINCE` wrote it (an
    unreadable version says nothing)."""
    version = str(release.h5.attrs.get("ncbench_version", ""))
    try:
        return tuple(int(part) for part in version.split(".")[:2]) < EXACT_PRODUCTS_SINCE
    except ValueError:
        return False


def _tensor(values: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(values))


def _check_link_pairs(pairs: np.ndarray, sites: np.ndarray, images: np.ndarray, kind: str) -> list[str]:
    """Each pair joins two sites, each encoding is in at most one pair, and the earlier site
    comes first; an ``image`` overlap holds the same pixels on both sides."""
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.size == 0:
        return ["truth/link_pairs must be a non-empty (T, 2) array of encoded rows"]
    if pairs.min() < 0 or pairs.max() >= len(sites):
        return ["truth/link_pairs names rows outside encoded/data"]
    if not (sites[pairs[:, 0]] < sites[pairs[:, 1]]).all():
        return ["truth/link_pairs must join an earlier site's encoding to a later site's"]
    if len(np.unique(pairs)) != pairs.size:
        return ["truth/link_pairs holds an encoding in more than one pair"]
    if kind not in OVERLAP_KINDS:
        return [f"truth/link_pairs: overlap_kind must be one of {', '.join(OVERLAP_KINDS)}, got {kind!r}"]
    if kind == "image" and not np.array_equal(images[pairs[:, 0]], images[pairs[:, 1]]):
        return ["truth/link_pairs: an image overlap whose two images differ"]
    return []


def _compare(
    encoders: list[Encoder], sites: np.ndarray, images, perms, batch, stored, name: str, note: str = ""
) -> list[str]:
    """Recompute encodings batch by batch (same batch composition, each with its site's key) and
    compare with ``stored``; ``note`` ends the message when they differ."""
    worst = 0.0
    with progress(f"verifying {name}", len(images)) as advance:
        for b in np.unique(batch):
            rows = np.flatnonzero(batch == b)
            encoder = encoders[sites[rows[0]]]
            recomputed = encoder.encode_batch(_tensor(images[rows]), _tensor(perms[rows].astype(np.int64))).numpy()
            try:
                found = stored[rows[0] : rows[-1] + 1][rows - rows[0]].astype(np.float32)
            except OSError:
                return [f"{name}: stored data is corrupt (HDF5 checksum failed)"]
            scale = np.maximum(np.abs(recomputed), 1.0)
            worst = max(worst, float((np.abs(found - recomputed) / scale).max()))
            advance(len(rows))
    if worst > RTOL:
        return [f"{name}: encodings differ from the key's recomputation (max relative error {worst:.2g}){note}"]
    return []
