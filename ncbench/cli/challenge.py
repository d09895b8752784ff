"""``ncbench challenge ...``: build, verify and inspect challenge releases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

# Only the torch-free configuration here: each command imports the encoder, files and builder it
# runs, so that `ncbench challenge --help` starts in a fraction of a second.
from ncbench.challenge.config import PRECISIONS, PRESETS, STORAGE_DTYPES, TASKS, resolve_config
from ncbench.errors import NcbenchError

TEST_RELEASE_WARNING = "warning: TEST RELEASE: its key is public; never run a real challenge on it"
SEED_FILE_LIMIT = 4096  # bytes: a seed file holds one line of hex digits


@click.group("challenge")
def group() -> None:
    """Organizer tools: build challenge releases and keys, verify and inspect them."""


@group.command()
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), required=True, help="Encoder preset (docs/tasks.md#encoder)."
)
@click.option("--task", type=click.Choice(TASKS), default="reid", show_default=True, help="Threat model.")
@click.option(
    "--source", default="sample", show_default=True, help="Images: sample, phantom, folder:PATH or manifest:FILE."
)
@click.option("--n", "n", type=int, required=True, help="Number of encoded images (per site with --sites).")
@click.option("--n-aux", type=int, help="transfer: auxiliary plaintexts [default: N].")
@click.option("--n-targets", type=int, help="transfer: target plaintexts [default: N/4].")
@click.option("--n-known", type=int, help="invert: known (plaintext, encoding) pairs [default: max(4, N/10)].")
@click.option(
    "--sites",
    type=int,
    default=1,
    show_default=True,
    help="Hospitals, each with its own independent key of the same architecture (reid, link).",
)
@click.option(
    "--overlap",
    type=float,
    help="link: fraction of each later site's images that an earlier site also holds [default: 0.25].",
)
@click.option(
    "--overlap-kind",
    type=click.Choice(["image", "patient"]),
    default="image",
    show_default=True,
    help="link: a shared image is the same pixels, or a second acquisition of the same patient.",
)
@click.option(
    "--seed",
    help="Key seed typed on the command line, for a --test-release only: a command line is seen by "
    "other users and kept in shell history [default: drawn from `secrets`].",
)
@click.option(
    "--seed-file",
    type=click.Path(path_type=Path),
    help="File holding the secret key seed as hex digits, at least 32 (128 bits); - reads standard input.",
)
@click.option(
    "--test-release",
    is_flag=True,
    help="Build a test release whose key is public: accepts a short seed (e.g. --seed 7) and says so in the release.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Release directory to create.")
@click.option("--force", is_flag=True, help="Replace an earlier release at --out (never a folder of other files).")
@click.option("--width", type=int, help="Override the encoder width D (default 2048).")
@click.option("--image-size", type=int, help="Override the image size (default 256).")
@click.option("--patch-size", type=int, help="Override the patch size (default 16).")
@click.option("--bn-batch", type=int, help="Override the BatchNorm batch size (default 256).")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), help="Storage dtype of encodings (default float16).")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Compute precision. fp32: the published architecture's arithmetic, the same bytes on any CPU. "
    "bf16 (or auto: bf16 where the device multiplies bf16 natively, CUDA, AMX or AVX-512 BF16 CPUs) only "
    "on request: faster there, but the encodings differ from fp32's; the release records the value used.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
def build(
    preset,
    task,
    source,
    n,
    n_aux,
    n_targets,
    n_known,
    sites,
    overlap,
    overlap_kind,
    seed,
    seed_file,
    test_release,
    out,
    force,
    device,
    **overrides,
) -> None:
    """Encode images with a fresh secret key and write OUT/public (give away) and OUT/private (keep)."""
    from ncbench import checked
    from ncbench.challenge.files import release_file
    from ncbench.challenge.release import BuildPlan, build_release

    if seed is not None and seed_file is not None:
        raise NcbenchError("give --seed or --seed-file, not both")
    if seed is not None and not test_release:
        raise NcbenchError(
            "a seed typed on the command line is seen by other users and kept in shell history: give a "
            "secret seed with --seed-file FILE (or - for standard input), or mark a --test-release"
        )
    if seed_file is not None:
        seed = read_seed_file(seed_file)
    config = resolve_config(preset, **overrides)
    plan = BuildPlan.for_task(
        task,
        n,
        n_aux=n_aux,
        n_targets=n_targets,
        n_known=n_known,
        sites=sites,
        overlap=overlap,
        overlap_kind=overlap_kind,
    )
    build_release(
        out, config=config, plan=plan, source=source, seed=seed, test_release=test_release, device=device, force=force
    )
    checked.mark_checked(release_file(out))  # written here: `attack run` need not check it
    click.echo(f"wrote {out}/public/release.h5 (publish) and {out}/private/key.h5 (keep secret)")
    if test_release:
        click.echo(TEST_RELEASE_WARNING, err=True)


def read_seed_file(path: Path) -> str:
    """The hex seed held by ``path`` (surrounding whitespace ignored); checked by ``build_release``."""
    try:
        if str(path) == "-":
            raw = sys.stdin.buffer.read(SEED_FILE_LIMIT + 1)
        else:
            with open(path, "rb") as handle:
                raw = handle.read(SEED_FILE_LIMIT + 1)
    except OSError as error:
        raise NcbenchError(f"--seed-file {path}: {error.strerror or error}") from None
    if len(raw) > SEED_FILE_LIMIT:
        raise NcbenchError(
            f"--seed-file {path}: larger than {SEED_FILE_LIMIT} bytes; it should hold one line of hex digits"
        )
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise NcbenchError(f"--seed-file {path}: not hex digits (non-ASCII bytes)") from None


@group.command("site-key")
@click.argument("key_path", type=click.Path(path_type=Path))
@click.option("--site", type=int, required=True, help="The site (0-based) whose key to export.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File to write.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def site_key_command(key_path: Path, site: int, out: Path, force: bool) -> None:
    """Export one site's key tensors (no seed, no truth): the insider a colluding hospital would be.

    KEY_PATH is a private key.h5 or its release directory. Attacks take the file as knowledge,
    e.g. `ncbench attack run gram-hungarian --param insider_key=FILE ...`.
    """
    from ncbench.challenge.files import open_key, write_site_key

    with open_key(key_path) as key:
        write_site_key(key, site, out, force=force)
    click.echo(f"wrote {out}: the key of site {site} only")


@group.command("verify")
@click.argument("release_dir", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    help="Private key (file or release directory): also recompute every encoding.",
)
def verify_command(release_dir: Path, key_path: Path | None) -> None:
    """Check that a release can be read within the bounds its bytes set (in a limited child, as
    `ncbench fetch` checks a release it downloads), then its checksums, and with --key its
    commitment and every encoding."""
    from ncbench.challenge.files import open_release, release_file
    from ncbench.challenge.verify import verify
    from ncbench.leaderboard import isolated

    path = release_file(release_dir)
    if release_dir.is_dir() and path.is_file():
        isolated.check_release_once(path, str(path), again=True)
    problems = verify(release_dir, key_path)
    if problems:
        for line in problems:
            click.echo(f"FAIL {line}", err=True)
        raise SystemExit(1)
    what = (
        "layout, checksums, commitment and encodings"
        if key_path
        else "layout and checksums (pass --key to check encodings)"
    )
    click.echo(f"OK {release_dir}: {what} verified")
    with open_release(release_dir) as release:
        if release.test_release:
            click.echo(TEST_RELEASE_WARNING, err=True)


@group.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--show-secrets", is_flag=True, help="For a key file: also print the seed.")
def info(path: Path, show_secrets: bool) -> None:
    """Print what a release or key file holds (attributes and dataset shapes)."""
    from ncbench.challenge.files import open_key, open_release

    try:
        handle = open_release(path)
        description = handle.describe()
    except NcbenchError as release_error:
        try:
            handle = open_key(path)
        except NcbenchError:
            raise release_error from None
        description = handle.describe(secrets=show_secrets)
    test_release = handle.test_release
    handle.close()
    click.echo(json.dumps(description, indent=2, sort_keys=True, default=str))
    if test_release:
        click.echo(TEST_RELEASE_WARNING, err=True)


@group.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Manifest CSV to write (a .json sidecar is written beside it).",
)
@click.option("--name", required=True, help="Name of the image set.")
@click.option("--licence", default="unknown", show_default=True, help="Licence of the images.")
@click.option("--labels", type=click.Path(path_type=Path), help="CheXpert-style labels CSV.")
@click.option(
    "--splits",
    help="Split fractions: train,val,test as 0.7,0.1,0.2, or named as train=0.8,test=0.2 (default: all test).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the split assignment.")
def manifest(folder, out, name, licence, labels, splits, seed) -> None:
    """Write a data manifest (paths, sha256, splits, labels) for an image folder."""
    from ncbench.data_manifest.manifest import assign_splits, write_manifest

    fractions = parse_split_fractions(splits) if splits else None
    assign_splits(0, fractions, seed)  # checks the fractions now, not after hashing every image
    path = write_manifest(
        folder, out, name=name, licence=licence, split_fractions=fractions, labels_csv=labels, seed=seed
    )
    click.echo(f"wrote {path}")


def parse_split_fractions(text: str) -> dict[str, float]:
    """``0.7,0.1,0.2`` (train, val, test) or ``name=fraction,...`` -> {split: fraction}."""
    items = [item.strip() for item in text.split(",")]
    named = all("=" in item for item in items)
    if not named and (len(items) != 3 or any("=" in item for item in items)):
        raise NcbenchError(
            f"--splits must be train,val,test fractions like 0.7,0.1,0.2 or name=fraction pairs, got {text!r}"
        )
    pairs = [item.split("=", 1) for item in items] if named else list(zip(("train", "val", "test"), items))
    fractions: dict[str, float] = {}
    for name, value in pairs:
        name = name.strip()
        if name in fractions:
            raise NcbenchError(f"--splits names split {name!r} twice")
        try:
            fractions[name] = float(value)
        except ValueError:
            raise NcbenchError(f"--splits: fraction {value!r} of {name!r} is not a number") from None
    return fractions
