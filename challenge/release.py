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
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

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
    KEY_FORMAT,
    RELEASE_FORMAT,
    SCHEMA_VERSION,
    TASKS,
    ReleaseLayout,
    canonical_digest,
)
from ncbench.challenge.sources import ImageSet, load_images
from ncbench.errors import NcbenchError
from ncbench.h5io import (
    atomic_path,
    create_streamed,
    set_root_attrs,
    sha256_file,
    write_dataset,
)
from ncbench.progress import progress

SEED_BYTES = 32  # a fresh build seed: 256 bits from `secrets`
MIN_SECRET_HEX = 32  # 128 bits: the least secret entropy a real release's key may come from
MAX_SEED_HEX = 1024
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
        seeds against the public release (issue 10), so only a test release, whose key is public
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
    """How many images play each role; roles never share an image (held-out discipline)."""

    task: str
    n: int  # encoded images
    n_aux: int = 0  # transfer: auxiliary plaintexts
    n_targets: int = 0  # transfer: targets whose encodings stay hidden
    n_known: int = 0  # invert: known (plaintext, encoding) pairs, a subset of the encoded set

    @classmethod
    def for_task(cls, task: str, n: int, *, n_aux=None, n_targets=None, n_known=None) -> BuildPlan:
        if task not in TASKS:
            raise NcbenchError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if n < 2:
            raise NcbenchError(f"--n must be at least 2, got {n}")
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
        return cls(task, n)

    @property
    def n_images(self) -> int:
        return self.n + self.n_aux + self.n_targets


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
    build_seed = BuildSeed.of(seed, test_release=test_release)
    device = pick_device(device)
    config = config.for_device(device)  # the file records the precision used, never "auto"
    images = load_images(
        source, n=plan.n_images, seed=derive_seed(build_seed.text, "images"), image_size=config.image_size
    )
    if len(images) != plan.n_images:
        raise NcbenchError(f"source {source!r} gave {len(images)} images, {plan.n_images} needed")
    roles: dict = _assign_roles(len(images), plan, np.random.default_rng(derive_seed(build_seed.text, "roles")))
    roles["images"] = images
    description = images.description
    del images  # _write drops the only copy once the plaintexts are on disk, before encoding
    out = Path(out)
    with atomic_path(out, force=force) as tmp:
        layout = ReleaseLayout(tmp)
        layout.public.mkdir(parents=True)
        layout.private.mkdir()
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
    return out


def _assign_roles(n_images: int, plan: BuildPlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of the loaded images for each role (indices, not copies: images are 64 KB each)."""
    order = rng.permutation(n_images)
    roles = {"encoded": order[: plan.n]}
    if plan.task == "reid":
        roles["plain_index"] = rng.permutation(plan.n)  # plain row of each encoding
    elif plan.task == "transfer":
        roles["aux"] = order[plan.n : plan.n + plan.n_aux]
        roles["targets"] = order[plan.n + plan.n_aux :]
    else:
        roles["known"] = np.sort(rng.choice(plan.n, size=plan.n_known, replace=False))
    return roles


def _write(tmp: Path, *, config, plan, roles, build_seed: BuildSeed, test_release, device, source_description) -> None:
    seed = build_seed.text
    salt = np.frombuffer(build_seed.salt(), np.uint8).copy()
    # The id hashes the (secret) salt, never the seed alone: a public value must not let anyone
    # test guesses of the seed.
    challenge_id = f"{config.preset}-{plan.task}-{hashlib.sha256(salt.tobytes() + b':challenge-id').hexdigest()[:8]}"
    marks = {"test_release": np.int64(1)} if test_release else {}
    key = sample_key(config, seed)
    encoder = Encoder(config, key, device)
    image_set: ImageSet = roles.pop("images")
    encoded_rows = roles["encoded"]  # rows of image_set, in encoded order
    n = plan.n
    perms = sample_permutations(config, seed, n)
    rng = np.random.default_rng(derive_seed(seed, "split"))
    split = _halves(n, rng)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))
    encoded_ids = [f"enc-{i:05d}" for i in range(n)]
    layout = ReleaseLayout(tmp)
    release_path, key_path = layout.release, layout.key

    with h5py.File(key_path, "w", track_order=False) as key_h5:
        set_root_attrs(key_h5, KEY_FORMAT, SCHEMA_VERSION, challenge_id=challenge_id, task=plan.task, **marks)
        group = key_h5.create_group("encoder")
        group.attrs["seed"] = seed
        group.attrs["encoder_config"] = config.to_json()
        for name in key_tensor_names(config):
            write_dataset(group, name, key[name].numpy())
        truth = key_h5.create_group("truth")
        write_dataset(truth, "patch_perm", perms)
        write_dataset(truth, "batch", (np.arange(n) // config.bn_batch).astype(np.int32))
        write_dataset(truth, "split", split)
        if plan.task == "reid":
            write_dataset(truth, "plain_index", roles["plain_index"].astype(np.int32))
        else:
            _write_rows(truth, "images", image_set.images, encoded_rows)
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
        labels = write_dataset(group, "labels", image_set.labels[encoded_rows].astype(np.int8))
        labels.attrs["label_names"] = json.dumps(list(image_set.label_names))
        # Plaintexts go to disk first; encoding then reads them back batch by batch, so no image
        # array stays in memory while the (much larger) encodings are computed.
        plain = rel.create_group("plain")
        if plan.task == "reid":
            pool_rows = np.argsort(roles["plain_index"])  # encoded row held by each plain row
            _write_rows(plain, "images", image_set.images, encoded_rows[pool_rows])
            write_dataset(plain, "ids", [f"img-{j:05d}" for j in range(n)])
            encoded_images = RowView(plain["images"], roles["plain_index"])
        else:
            if plan.task == "transfer":
                _write_rows(plain, "images", image_set.images, roles["aux"])
                write_dataset(plain, "ids", [f"aux-{j:05d}" for j in range(plan.n_aux)])
                target = rel.create_group("target")
                _write_rows(target, "images", image_set.images, roles["targets"])
                write_dataset(target, "ids", [f"tgt-{j:05d}" for j in range(plan.n_targets)])
            else:
                known = roles["known"]
                _write_rows(plain, "images", image_set.images, encoded_rows[known])
                write_dataset(plain, "ids", [f"img-{j:05d}" for j in range(len(known))])
                write_dataset(rel.create_group("pairs"), "encoded_ids", [encoded_ids[i] for i in known])
            encoded_images = RowView(key_h5["truth/images"], np.arange(n))
        del image_set
        dataset = create_streamed(group, "data", (n, config.n_patches, config.width), config.dtype)
        _encode_into(dataset, encoder, encoded_images, perms, "encoding")

    if plan.task == "transfer":
        with h5py.File(key_path, "a") as key_h5, h5py.File(release_path, "r") as rel:
            dataset = create_streamed(
                key_h5["truth"], "target_encodings", (plan.n_targets, config.n_patches, config.width), config.dtype
            )
            target_images = RowView(rel["target/images"], np.arange(plan.n_targets))
            _encode_into(dataset, encoder, target_images, key_h5["truth/target_patch_perm"][()], "targets")
            # The commitment covers the target encodings too: recompute and patch the release.
            commitment = hashlib.sha256(salt.tobytes() + canonical_digest(key_h5)).hexdigest()
        with h5py.File(release_path, "a") as rel:
            rel.attrs["key_commitment"] = commitment

    with h5py.File(key_path, "a") as key_h5:
        key_h5.attrs["release_sha256"] = sha256_file(release_path)
    write_sha256sums(layout.public)
    write_sha256sums(layout.private)


class RowView:
    """Rows ``index`` (N,) of an (M, ...) HDF5 dataset, read on demand by slice: ``view[a:b]``."""

    def __init__(self, dataset: h5py.Dataset, index: np.ndarray):
        self.dataset, self.index = dataset, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, window: slice) -> np.ndarray:
        rows = self.index[window]
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.dataset.shape[1:]), self.dataset.dtype)
        out[order] = self.dataset[rows[order]]  # h5py reads increasing indices only
        return out


def _write_rows(group: h5py.Group, name: str, images: np.ndarray, rows: np.ndarray, block: int = 256) -> None:
    """``images[rows]`` written block by block, without a second full copy in memory."""
    dataset = create_streamed(group, name, (len(rows), *images.shape[1:]), images.dtype)
    for start in range(0, len(rows), block):
        dataset[start : start + block] = images[rows[start : start + block]]


def _halves(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) uint8: 0 for the public scoring half, 1 for the private half, chosen at random."""
    split = np.zeros(n, np.uint8)
    split[rng.permutation(n)[n // 2 :]] = 1
    return split


def _encode_into(dataset: h5py.Dataset, encoder: Encoder, images: RowView, perms: np.ndarray, label: str) -> None:
    """Stream encodings batch by batch into ``dataset``: memory never holds more than one batch."""
    with progress(f"{label} {encoder.config.preset}", len(images)) as advance:
        for start, encoded in encoder.encode_stream(images, perms, on_batch=advance):
            dataset[start : start + len(encoded)] = encoded.numpy().astype(dataset.dtype)
            del encoded  # before the next batch is computed, or two batches are alive at once


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
