"""Build a challenge release: public encodings + plaintexts, and the private key (docs/format.md).

Layout written atomically (a temporary sibling directory renamed into place)::

    <out>/public/release.h5   <out>/public/SHA256SUMS
    <out>/private/key.h5      <out>/private/SHA256SUMS
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ncbench.challenge.config import MAX_SIZE
from ncbench.challenge.encoders import (
    Encoder,
    EncoderConfig,
    derive_seed,
    key_tensor_names,
    pick_device,
    sample_key,
    sample_permutations,
)
from ncbench.challenge.files import (
    DIGEST_CANONICAL,
    KEY_FORMAT,
    RELEASE_FORMAT,
    SCHEMA_VERSION,
    SITE_TASKS,
    TASKS,
    ReleaseLayout,
    canonical_digest,
)
from ncbench.challenge.sources import ImageSet, load_images
from ncbench.errors import NcbenchError, disk_full
from ncbench.h5io import (
    atomic_path,
    available_memory,
    check_output,
    create_streamed,
    format_bytes,
    read_rows,
    set_root_attrs,
    sha256_file,
    write_dataset,
    write_rows,
)
from ncbench.private import create_private_file, private_dir
from ncbench.progress import progress

SEED_BYTES = 32  # a fresh build seed: 256 bits from `secrets`
MIN_SECRET_HEX = 32  # 128 bits: the least secret entropy a real release's key may come from
MAX_SEED_HEX = 1024
MAX_SITES = 16
DEFAULT_OVERLAP = 0.25
OVERLAP_KINDS = ("image", "patient")
# A full-width release stores each encoding's channels in blocks of this many: the attacks read the
# first 512 of 2,048 at shallow depth, and inflate only those (a row inflated whole costs 4x).
ENCODED_BLOCK_CHANNELS = 512
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class BuildSeed:
    """The seed of one build: ``text`` is what every derivation hashes and the key records."""

    text: str  # lowercase hex (a secret seed), or decimal (an integer test seed)
    secret: bool  # at least 128 bits of secret entropy: only then may public values derive from it

    @classmethod
    def of(cls, seed: bytes | str | int | None, *, test_release: bool = False) -> BuildSeed:
        """``None`` draws 32 bytes from `secrets`; bytes or a hex string are secret when they hold at
        least 128 bits (32 hex digits). Anything weaker, an integer included, is found by trying
        seeds against the public release, so only a test release, whose key is public
        by declaration, accepts it."""
        if seed is None:
            return cls(secrets.token_bytes(SEED_BYTES).hex(), secret=True)
        if isinstance(seed, bytes):
            text, secret = seed.hex(), 2 * len(seed) >= MIN_SECRET_HEX
        elif isinstance(seed, str):
            text = seed.strip().lower()
            if not _HEX.fullmatch(text):  # the seed may be secret: say what is wrong, never echo it
                raise NcbenchError(f"a seed is hex digits (0-9, a-f); got {len(seed)} characters, not all hex digits")
            secret = len(text) >= MIN_SECRET_HEX
        elif isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
            text, secret = str(seed), False
        else:
            raise NcbenchError(
                f"a seed is bytes, a hex string or (test releases only) an integer >= 0, got {type(seed).__name__}"
            )
        if not text:
            raise NcbenchError("the seed is empty")
        if len(text) > MAX_SEED_HEX:
            raise NcbenchError(f"a seed has at most {MAX_SEED_HEX} hex digits, got {len(text)}")
        if not (secret or test_release):
            strength = "an integer seed" if isinstance(seed, int) else f"a seed of {4 * len(text)} bits"
            raise NcbenchError(
                f"{strength} can be guessed from the public release: give at least 128 bits "
                f"({MIN_SECRET_HEX} hex digits, e.g. with --seed-file), leave the seed out to draw one, "
                "or pass --test-release to build a release marked as having a public key"
            )
        return cls(text, secret)

    def salt(self) -> bytes:
        """The commitment salt (32 bytes). A secret seed keys it, so a build is reproducible from the
        seed; a guessable seed must decide no public value, so its salt is fresh randomness."""
        if self.secret:
            return hashlib.sha256(f"{self.text}:salt".encode()).digest()
        return secrets.token_bytes(32)


@dataclass(frozen=True)
class BuildPlan:
    """How many images play each role; roles never share an image (held-out discipline), except
    the overlap of a ``link`` release: images (or patients) held by two sites."""

    task: str
    n: int  # encoded images, all sites together
    n_aux: int = 0  # transfer: auxiliary plaintexts
    n_targets: int = 0  # transfer: targets whose encodings stay hidden
    n_known: int = 0  # invert: known (plaintext, encoding) pairs, a subset of the encoded set
    sites: int = 1  # hospitals, each with its own key and n / sites encodings
    n_overlap: int = 0  # link: encodings of each site k >= 1 whose image an earlier site also holds
    overlap_kind: str = "image"  # link: "image" (the same pixels) or "patient" (a second acquisition)

    @classmethod
    def for_task(
        cls,
        task: str,
        n: int,
        *,
        n_aux=None,
        n_targets=None,
        n_known=None,
        sites: int = 1,
        overlap: float | None = None,
        overlap_kind: str = "image",
    ) -> BuildPlan:
        """``n`` encodings per site; ``overlap``: the fraction of each later site's images that an
        earlier site also holds (``link`` only, default 0.25)."""
        if task not in TASKS:
            raise NcbenchError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if n < 2:
            raise NcbenchError(f"--n must be at least 2, got {n}")
        for flag, count in (("--n", n), ("--n-aux", n_aux), ("--n-targets", n_targets)):  # --n-known is below --n
            if count is not None and count > MAX_SIZE:
                raise NcbenchError(f"{flag} must be at most {MAX_SIZE:,}, got {count}")
        if not 1 <= sites <= MAX_SITES:
            raise NcbenchError(f"--sites must be between 1 and {MAX_SITES}, got {sites}")
        if sites > 1 and task not in SITE_TASKS:
            raise NcbenchError(f"--sites is for the {' and '.join(SITE_TASKS)} tasks, not {task}")
        if task != "link":
            if overlap is not None:
                raise NcbenchError("--overlap is for the link task")
            return cls._single(task, n, n_aux=n_aux, n_targets=n_targets, n_known=n_known, sites=sites)
        if sites < 2:
            raise NcbenchError("the link task needs --sites 2 or more")
        if overlap_kind not in OVERLAP_KINDS:
            raise NcbenchError(f"--overlap-kind must be one of {', '.join(OVERLAP_KINDS)}, got {overlap_kind!r}")
        overlap = DEFAULT_OVERLAP if overlap is None else overlap
        n_overlap = round(overlap * n) if 0 < overlap <= 0.5 else 0  # NaN and infinities are out of range
        if n_overlap < 1:
            raise NcbenchError(
                f"--overlap must leave 1 to n/2 shared images per site (0 < overlap <= 0.5), got {overlap}"
            )
        return cls(task, n * sites, sites=sites, n_overlap=n_overlap, overlap_kind=overlap_kind)

    @classmethod
    def _single(cls, task: str, n: int, *, n_aux, n_targets, n_known, sites: int) -> BuildPlan:
        if task == "transfer":
            plan = cls(
                task,
                n,
                n_aux=n if n_aux is None else n_aux,
                n_targets=max(2, n // 4) if n_targets is None else n_targets,
            )
            if plan.n_aux < 1 or plan.n_targets < 2:
                raise NcbenchError("transfer needs --n-aux >= 1 and --n-targets >= 2")
            return plan
        if task == "invert":
            plan = cls(task, n, n_known=max(4, n // 10) if n_known is None else n_known)
            if not 1 <= plan.n_known < n:
                raise NcbenchError(f"--n-known must be between 1 and {n - 1}, got {plan.n_known}")
            return plan
        return cls(task, n * sites, sites=sites)

    @property
    def n_images(self) -> int:
        """Distinct images to load: an overlapping encoding reuses an earlier site's image."""
        return self.n + self.n_aux + self.n_targets - (self.sites - 1) * self.n_overlap

    @property
    def site_blocks(self) -> list[slice]:
        """Encoded rows of each site: consecutive blocks of n / sites."""
        size = self.n // self.sites
        return [slice(k * size, (k + 1) * size) for k in range(self.sites)]


def build_release(
    out: str | os.PathLike,
    *,
    config: EncoderConfig,
    plan: BuildPlan,
    source: str,
    seed: bytes | str | int | None = None,
    test_release: bool = False,
    device: str | None = "auto",
    force: bool = False,
) -> Path:
    """Load images, encode them with a fresh key, and write the release directory ``out``.

    ``seed``: None (a fresh secret seed), or a secret of at least 128 bits as bytes or hex text
    (the same seed rebuilds the same files). ``test_release=True`` marks the release as one whose
    key is public, and only then is a weaker seed (a small integer) accepted.
    """
    check_output(out, force=force, directory=True, replaceable=_built_release)  # before any work
    build_seed = BuildSeed.of(seed, test_release=test_release)
    device = pick_device(device)
    config = config.for_device(device)  # the file records the precision used, never "auto"
    _check_memory(config, plan)
    try:
        images = load_images(
            source, n=plan.n_images, seed=derive_seed(build_seed.text, "images"), image_size=config.image_size
        )
    except (MemoryError, RuntimeError) as error:  # a source that needs more than _check_memory counts
        if not _out_of_memory(error):
            raise
        raise NcbenchError(
            f"loading {plan.n_images:,} images of {config.image_size}x{config.image_size} pixels ran out of "
            "memory; ask for fewer or smaller images"
        ) from None
    if len(images) != plan.n_images:
        raise NcbenchError(f"source {source!r} gave {len(images)} images, {plan.n_images} needed")
    roles: dict = _assign_roles(len(images), plan, np.random.default_rng(derive_seed(build_seed.text, "roles")))
    roles["images"] = images
    description = images.description
    del images  # _write drops the only copy once the plaintexts are on disk, before encoding
    out = Path(out)
    try:
        with atomic_path(out, force=force, directory=True, replaceable=_built_release) as tmp:
            layout = ReleaseLayout(tmp)
            layout.public.mkdir(parents=True)
            private_dir(layout.private)  # 0700 and the key 0600, whatever the umask
            _write(
                tmp,
                config=config,
                plan=plan,
                roles=roles,
                build_seed=build_seed,
                test_release=test_release,
                device=device,
                source_description=description,
            )
    except (OSError, RuntimeError) as error:  # h5py raises either, with the errno or in its text
        if not disk_full(error):
            raise
        raise NcbenchError(
            f"{out}: the disk filled up while the release was written; nothing was kept "
            f"(the release and its key take about {format_bytes(_written_bytes(config, plan))})"
        ) from None
    return out


def _written_bytes(config: EncoderConfig, plan: BuildPlan) -> int:
    """Bytes a build writes before deflate (which barely shrinks encodings and weights): the
    encodings (and a transfer task's targets), each site's key and the 8-bit images."""
    encoded = (plan.n + plan.n_targets) * config.n_patches * config.width * np.dtype(config.dtype).itemsize
    return encoded + plan.sites * _key_bytes(config) + plan.n_images * config.image_size**2


# A source renders, decodes or resizes each image in floating point, a few float32 copies of it at
# least (measured per pixel of an image in the making: phantom about 90 bytes, sample 90 to 200, folder 25).
MIN_WORK_BYTES_PER_PIXEL = 16


def _check_memory(config: EncoderConfig, plan: BuildPlan) -> None:
    """Refuse, before any work, a build whose key, images or batch of encodings cannot fit in the
    memory available. Each phase is counted at the least it holds, so a build that fits is never
    refused. Loading: the images (uint8) and one image in the making; then the patch permutations
    (int16, kept to the end) and, for link, each site's images gathered in one copy. Encoding: the
    key and the encoder's copy of it, and one BatchNorm batch of encodings as computed (float32)
    and as stored; the encodings themselves stream to disk."""
    available = available_memory()
    if available is None:
        return
    side, n_patches = config.image_size, config.n_patches
    rows = min(config.bn_batch, max(plan.n // plan.sites, plan.n_targets))  # a batch stays in a site, or the targets
    weights = 2 * _key_bytes(config)
    perms = 2 * (plan.n + plan.n_targets) * n_patches
    gathered = plan.n * side**2 if plan.task == "link" else 0
    loading = plan.n_images * side**2 + max(MIN_WORK_BYTES_PER_PIXEL * side**2, perms + gathered)
    encoding = weights + perms + rows * n_patches * config.width * (4 + np.dtype(config.dtype).itemsize)
    for needed, what in (
        (weights, f"the {config.preset} key of width {config.width} and the encoder's copy of it take"),
        (loading, f"loading {plan.n_images:,} images of {side}x{side} pixels takes at least"),
        (
            encoding,
            f"encoding a batch of {rows:,} images ({n_patches:,} patches of width {config.width:,} each) "
            "with its key takes at least",
        ),
    ):
        if needed > available:
            raise NcbenchError(
                f"{what} {format_bytes(needed)}; this machine has {format_bytes(available)} of memory available"
            )


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is numpy's or torch's report of an allocation that failed."""
    return isinstance(error, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def _key_bytes(config: EncoderConfig) -> int:
    """Bytes of one key's float32 tensors."""
    width = config.width
    values = width * (config.patch_dim + 1) + config.depth * width * (width + 1)
    if config.mix:
        values += config.n_patches * width + width * (width + 1)
    return 4 * values


def _built_release(path: Path) -> bool:
    """Whether ``--force`` may replace the directory ``path``: a release (nothing in it but its
    public and private halves) or an empty directory, never a folder of other files."""
    return {entry.name for entry in path.iterdir()} <= {"public", "private"}


def _assign_roles(n_images: int, plan: BuildPlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of the loaded images for each role (indices, not copies: images are 64 KB each)."""
    order = rng.permutation(n_images)
    if plan.task == "link":
        return _link_roles(order, plan, rng)
    roles = {"encoded": order[: plan.n]}
    if plan.task == "reid":
        roles["plain_index"] = rng.permutation(plan.n)  # plain row of each encoding
    elif plan.task == "transfer":
        roles["aux"] = order[plan.n : plan.n + plan.n_aux]
        roles["targets"] = order[plan.n + plan.n_aux :]
    else:
        roles["known"] = np.sort(rng.choice(plan.n, size=plan.n_known, replace=False))
    return roles


def _link_roles(order: np.ndarray, plan: BuildPlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Image of each encoded row, and the overlap: each site k >= 1 holds ``n_overlap`` images of
    encodings of earlier sites, at random rows of its block. An encoding is in at most one pair
    (a patient seen at two hospitals, not three), so the pairs are the whole truth."""
    source = np.empty(plan.n, np.int64)
    paired = np.zeros(plan.n, bool)
    pairs, fresh = [], iter(order)
    for k, block in enumerate(plan.site_blocks):
        rows = rng.permutation(np.arange(block.start, block.stop))
        m = plan.n_overlap if k else 0
        partners = np.sort(rng.choice(np.flatnonzero(~paired[: block.start]), size=m, replace=False)) if m else []
        shared, own = rows[:m], rows[m:]
        source[own] = [next(fresh) for _ in own]
        source[shared] = source[partners]
        paired[partners] = paired[shared] = True
        pairs += zip(partners, shared)
    return {"encoded": source, "link_pairs": np.array(sorted(pairs), np.int32).reshape(-1, 2)}


def reacquire(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A second x-ray of the same patients: (B, S, S) uint8 shifted by up to 4 % of the side,
    with a gain of 0.9-1.1, an offset of -8..8 grey levels and N(0, 3) noise."""
    out = np.empty_like(images)
    side = images.shape[-1]
    reach = max(1, side // 25)
    for b, image in enumerate(images):
        dy, dx = rng.integers(-reach, reach + 1, size=2)
        padded = np.pad(image, reach, mode="edge")
        moved = padded[reach + dy : reach + dy + side, reach + dx : reach + dx + side].astype(np.float32)
        moved = moved * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8) + rng.normal(0, 3, moved.shape)
        out[b] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
    return out


def site_seed(seed: str, site: int) -> str:
    """The seed text of a site's key: the build seed for site 0 (so a single-site release is what
    it always was), an independent derivation for every other site."""
    return seed if site == 0 else f"{seed}:site-{site}"


def _write(tmp: Path, *, config, plan, roles, build_seed: BuildSeed, test_release, device, source_description) -> None:
    seed = build_seed.text
    salt = np.frombuffer(build_seed.salt(), np.uint8).copy()
    # The id hashes the (secret) salt, never the seed alone: a public value must not let anyone
    # test guesses of the seed.
    challenge_id = f"{config.preset}-{plan.task}-{hashlib.sha256(salt.tobytes() + b':challenge-id').hexdigest()[:8]}"
    marks = {"test_release": np.int64(1)} if test_release else {}
    if plan.sites > 1:
        marks["n_sites"] = np.int64(plan.sites)
    image_set: ImageSet = roles.pop("images")
    encoded_rows = roles["encoded"]  # rows of image_set, in encoded order
    n = plan.n
    perms = sample_permutations(config, seed, n)
    rng = np.random.default_rng(derive_seed(seed, "split"))
    split = _halves(n, rng)
    batch = _batches(plan, config.bn_batch)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))
    encoded_ids = [f"enc-{i:05d}" for i in range(n)]
    layout = ReleaseLayout(tmp)
    release_path, key_path = layout.release, layout.key

    create_private_file(key_path)  # h5py keeps the mode of the file it truncates
    with h5py.File(key_path, "w", track_order=False) as key_h5:
        set_root_attrs(
            key_h5,
            KEY_FORMAT,
            SCHEMA_VERSION,
            challenge_id=challenge_id,
            task=plan.task,
            digest=DIGEST_CANONICAL,
            **marks,
        )
        group = key_h5.create_group("encoder")
        group.attrs["seed"] = seed
        group.attrs["encoder_config"] = config.to_json()
        for site in range(plan.sites):
            key = sample_key(config, site_seed(seed, site))  # one site's key in memory at a time
            site_group = group if site == 0 else key_h5.require_group("sites").create_group(str(site))
            for name in key_tensor_names(config):
                write_dataset(site_group, name, key[name].numpy())
            del key
        truth = key_h5.create_group("truth")
        write_dataset(truth, "patch_perm", perms)
        write_dataset(truth, "batch", batch)
        write_dataset(truth, "split", split)
        if plan.task == "reid":
            write_dataset(truth, "plain_index", roles["plain_index"].astype(np.int32))
        elif plan.task == "link":
            _write_link_truth(truth, image_set.images, encoded_rows, roles["link_pairs"], plan, seed)
        else:
            write_selected_rows(truth, "images", image_set.images, encoded_rows)
        if plan.task == "transfer":
            target_perms = sample_permutations(config, seed, plan.n_targets, "target-permutations")
            write_dataset(truth, "target_patch_perm", target_perms)
            write_dataset(truth, "target_split", _halves(plan.n_targets, rng))
        write_dataset(key_h5.create_group("commitment"), "salt", salt)
        commitment = hashlib.sha256(salt.tobytes() + canonical_digest(key_h5)).hexdigest()

    with h5py.File(release_path, "w") as rel, h5py.File(key_path, "r") as key_h5:
        set_root_attrs(
            rel,
            RELEASE_FORMAT,
            SCHEMA_VERSION,
            challenge_id=challenge_id,
            task=plan.task,
            preset=config.preset,
            encoder_config=config.to_json(),
            n_encoded=np.int64(n),
            key_commitment=commitment,
            created_utc=created,
            source=source_description,
            **marks,
        )
        group = rel.create_group("encoded")
        write_dataset(group, "ids", encoded_ids)
        if plan.sites > 1:
            write_dataset(group, "site", np.repeat(np.arange(plan.sites), n // plan.sites).astype(np.int16))
        labels = write_dataset(group, "labels", image_set.labels[encoded_rows].astype(np.int8))
        labels.attrs["label_names"] = json.dumps(list(image_set.label_names))
        # Plaintexts go to disk first; encoding then reads them back batch by batch, so no image
        # array stays in memory while the (much larger) encodings are computed.
        plain = None if plan.task == "link" else rel.create_group("plain")  # link: sites hold no plaintext
        if plan.task == "reid":
            pool_rows = np.argsort(roles["plain_index"])  # encoded row held by each plain row
            write_selected_rows(plain, "images", image_set.images, encoded_rows[pool_rows])
            write_dataset(plain, "ids", [f"img-{j:05d}" for j in range(n)])
            encoded_images = RowView(plain["images"], roles["plain_index"])
        else:
            if plan.task == "transfer":
                write_selected_rows(plain, "images", image_set.images, roles["aux"])
                write_dataset(plain, "ids", [f"aux-{j:05d}" for j in range(plan.n_aux)])
                target = rel.create_group("target")
                write_selected_rows(target, "images", image_set.images, roles["targets"])
                write_dataset(target, "ids", [f"tgt-{j:05d}" for j in range(plan.n_targets)])
            elif plan.task == "invert":
                known = roles["known"]
                write_selected_rows(plain, "images", image_set.images, encoded_rows[known])
                write_dataset(plain, "ids", [f"img-{j:05d}" for j in range(len(known))])
                write_dataset(rel.create_group("pairs"), "encoded_ids", [encoded_ids[i] for i in known])
            encoded_images = RowView(key_h5["truth/images"], np.arange(n))
        del image_set
        shape = (n, config.n_patches, config.width)
        dataset = create_streamed(group, "data", shape, config.dtype, columns=ENCODED_BLOCK_CHANNELS)
        for site, block in enumerate(plan.site_blocks):
            encoder = Encoder(config, _site_key(key_h5, config, site), device)
            label = "encoding" if plan.sites == 1 else f"encoding site {site}"
            _encode_into(dataset, encoder, encoded_images, perms, label, rows=block)

    if plan.task == "transfer":
        with h5py.File(key_path, "a") as key_h5, h5py.File(release_path, "r") as rel:
            dataset = create_streamed(
                key_h5["truth"], "target_encodings", (plan.n_targets, config.n_patches, config.width), config.dtype
            )
            target_images = RowView(rel["target/images"], np.arange(plan.n_targets))
            target_perms = key_h5["truth/target_patch_perm"][()]
            _encode_into(dataset, encoder, target_images, target_perms, "targets", rows=slice(0, plan.n_targets))
            # The commitment covers the target encodings too: recompute and patch the release.
            commitment = hashlib.sha256(salt.tobytes() + canonical_digest(key_h5)).hexdigest()
        with h5py.File(release_path, "a") as rel:
            rel.attrs["key_commitment"] = commitment

    with h5py.File(key_path, "a") as key_h5:
        key_h5.attrs["release_sha256"] = sha256_file(release_path)
    write_sha256sums(layout.public)
    write_sha256sums(layout.private)


class RowView:
    """Rows ``index`` (N,) of an (M, ...) HDF5 dataset, read on demand: ``view[a:b]``, or
    ``view[positions]`` for an array of positions in ``index``."""

    def __init__(self, dataset: h5py.Dataset, index: np.ndarray):
        self.dataset, self.index = dataset, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.dataset.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    def __getitem__(self, window: slice | np.ndarray) -> np.ndarray:
        rows = self.index[window]
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.dataset.shape[1:]), self.dataset.dtype)
        out[order] = read_rows(self.dataset, rows[order], dtype=None)  # increasing indices only
        return out


def write_selected_rows(
    group: h5py.Group,
    name: str,
    images: np.ndarray | RowView,
    rows: np.ndarray,
    block: int = 256,
    *,
    columns: int | None = None,
) -> None:
    """``images[rows]`` written as dataset ``name`` of ``group``, block by block, without a second
    full copy in memory (``images`` a :class:`RowView` of another file: read block by block too);
    ``columns``: chunks of that many on the last axis (see :func:`~ncbench.h5io.create_streamed`)."""
    dataset = create_streamed(group, name, (len(rows), *images.shape[1:]), images.dtype, columns=columns)
    for start in range(0, len(rows), block):
        write_rows(dataset, start, images[rows[start : start + block]])


def _halves(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) uint8: 0 for the public scoring half, 1 for the private half, chosen at random."""
    split = np.zeros(n, np.uint8)
    split[rng.permutation(n)[n // 2 :]] = 1
    return split


def _encode_into(
    dataset: h5py.Dataset, encoder: Encoder, images: RowView, perms: np.ndarray, label: str, *, rows: slice
) -> None:
    """Stream the encodings of ``rows`` batch by batch into the same rows of ``dataset``: memory
    holds the batch being encoded and the one being written. BatchNorm batches start at ``rows.start``."""
    block = RowView(images.dataset, images.index[rows])
    # One batch is written (its rows deflated on the CPU's threads) while the next is encoded: on
    # a GPU the two overlap; on a CPU they share its cores, in the same time as one after the other.
    with progress(f"{label} {encoder.config.preset}", len(block)) as advance, ThreadPoolExecutor(1) as writer:
        written = None
        for start, encoded in encoder.encode_stream(block, perms[rows], on_batch=advance):
            values = encoded.numpy().astype(dataset.dtype)
            del encoded  # before the next batch is computed, or two batches are alive at once
            if written is not None:
                written.result()  # batches reach the file in order: a build gives the same bytes each time
            written = writer.submit(write_rows, dataset, rows.start + start, values)
            del values
        if written is not None:
            written.result()


def _batches(plan: BuildPlan, bn_batch: int) -> np.ndarray:
    """(N,) int32 BatchNorm batch of each encoding, numbered 0, 1, ...: consecutive rows of one
    site, never mixing sites (each hospital encodes its own images)."""
    ids, first = [], 0
    for block in plan.site_blocks:
        local = np.arange(block.stop - block.start) // bn_batch
        ids.append(first + local)
        first += int(local[-1]) + 1
    return np.concatenate(ids).astype(np.int32)


def _site_key(key_h5: h5py.File, config, site: int) -> dict:
    import torch

    group = key_h5["encoder" if site == 0 else f"sites/{site}"]
    return {name: torch.from_numpy(group[name][()]) for name in key_tensor_names(config)}


def _write_link_truth(truth, images: np.ndarray, encoded_rows: np.ndarray, pairs: np.ndarray, plan, seed: str) -> None:
    """``truth/images`` (what each site encoded) and ``truth/link_pairs`` (rows holding the same
    image or patient, the earlier site's row first)."""
    encoded_images = images[encoded_rows]
    if plan.overlap_kind == "patient":
        later = pairs[:, 1]
        encoded_images[later] = reacquire(encoded_images[later], np.random.default_rng(derive_seed(seed, "reacquire")))
    write_selected_rows(truth, "images", encoded_images, np.arange(len(encoded_images)))
    dataset = write_dataset(truth, "link_pairs", pairs)
    dataset.attrs["overlap_kind"] = plan.overlap_kind


def write_sha256sums(folder: Path) -> None:
    """``sha256sum``-compatible list of every other file in ``folder``."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("".join(lines))


def read_sha256sums(folder: Path) -> dict[str, str]:
    path = folder / "SHA256SUMS"
    if not path.is_file():
        raise NcbenchError(f"{path}: missing")
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise NcbenchError(f"{path}: malformed line {line!r}")
        sums[name] = digest
    return sums
