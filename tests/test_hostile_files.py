"""Hostile input: what the generated cases of test_leaderboard_malformed.py do not show.

Declared-huge submissions scored in a real process under an address-space limit; tampered
releases refused by the CLI; the untrusted HDF5 reader still accepting every legitimate layout;
uploads stored without a suffix read by their content; damaged releases refused in one line.
"""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncbench.attacks.submission import Submission, read_submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.h5io import MAX_METADATA_BYTES, check_chunks, format_bytes, open_untrusted
from ncbench.leaderboard import isolated, workqueue
from ncbench.leaderboard.scoring import score_submission
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)
N, P = 12, 16
ADDRESS_LIMIT = 3 << 30  # a scorer with 3 GB of address space: any huge allocation would fail
# Runs the CLI in a fresh interpreter with RLIMIT_AS set before anything is imported.
LIMITED_CLI = (
    "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
    "from ncbench.cli import main; sys.argv[0] = 'ncbench'; main()"
)


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    out = root / "reid"
    build_release(
        out, config=TINY, plan=BuildPlan.for_task("reid", N), source="phantom", seed=11, test_release=True, device="cpu"
    )
    with open_release(out) as release, open_key(out) as key:
        mapping = [release.plain_ids[j] for j in key.read("truth/plain_index")]
        good = Submission(release.challenge_id, "test-attack", "1.0", release.encoded_ids, mapping=mapping)
    return out, good


def key_of(out):
    return out / "private" / "key.h5"


def counts(db):
    with Store(db) as store:
        return store.counts()


def declare(path, submission, name, shape, dtype="float64"):
    """``submission`` plus a dataset ``name`` declaring ``shape`` with nothing stored."""
    write_submission(path, submission)
    with h5py.File(path, "a") as handle:
        if name in handle:
            del handle[name]
        handle.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]))
    return path


@pytest.mark.parametrize(
    "name, shape, dtype",
    [
        ("reconstructions", (12 << 30 >> 13, 32, 32), "float64"),  # 12 GiB in a part reid ignores
        ("scores", (1 << 36, N), "float64"),  # 6.6 TB in a used part
        ("patch_positions", (1 << 58, P), "int8"),  # 4 EiB in a used part
    ],
)
def test_declared_huge_submission_ends_in_one_line_under_an_address_limit(challenge, tmp_path, name, shape, dtype):
    out, good = challenge
    db = tmp_path / "board.db"
    assert (
        CliRunner()
        .invoke(
            main,
            [
                "score",
                str(write_submission(tmp_path / "good.h5", good)),
                "--key",
                str(key_of(out)),
                "--db",
                str(db),
                "--team",
                "alice",
            ],
        )
        .exit_code
        == 0
    )
    before = counts(db)
    path = declare(tmp_path / "huge.h5", good, name, shape, dtype)
    assert path.stat().st_size < 100_000
    command = [
        sys.executable,
        "-c",
        LIMITED_CLI.format(limit=ADDRESS_LIMIT),
        "score",
        str(path),
        "--key",
        str(key_of(out)),
        "--db",
        str(db),
        "--team",
        "mallory",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused before reading" in lines[0], lines
    assert result.stdout == ""
    assert counts(db) == before  # no row, not even a `failed` one


def test_a_legitimate_submission_scores_under_the_same_address_limit(challenge, tmp_path):
    out, good = challenge
    command = [
        sys.executable,
        "-c",
        LIMITED_CLI.format(limit=ADDRESS_LIMIT),
        "score",
        str(write_submission(tmp_path / "good.h5", good)),
        "--key",
        str(key_of(out)),
        "--db",
        str(tmp_path / "board.db"),
        "--team",
        "alice",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "recorded as submission 1" in result.stdout


def test_tampered_release_is_refused_by_the_cli_and_writes_nothing(challenge, tmp_path):
    out, good = challenge
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    db = tmp_path / "board.db"
    path = write_submission(tmp_path / "good.h5", good)
    assert (
        CliRunner()
        .invoke(main, ["score", str(path), "--key", str(key_of(copy)), "--db", str(db), "--team", "alice"])
        .exit_code
        == 0
    )
    before = counts(db)
    with h5py.File(copy / "public" / "release.h5", "a") as release:
        release.attrs["preset"] = "nc47"
    result = CliRunner().invoke(
        main, ["score", str(path), "--key", str(key_of(copy)), "--db", str(db), "--team", "bob"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {copy / 'public' / 'release.h5'} is not the release this key was issued with "
        f"(its sha256 differs from the key's record)"
    ]
    assert counts(db) == before


# -- what the untrusted reader must still accept ------------------------------------------------------


def rewrite(path, good, **options):
    """``good``'s mapping file rewritten with h5py ``options`` instead of the project's filters."""
    write_submission(path, good)
    with h5py.File(path, "a") as handle:
        for name in ("encoded_ids", "mapping"):
            values = handle[name][()]
            del handle[name]
            handle.create_dataset(name, data=values, **options)
    return path


@pytest.mark.parametrize(
    "options",
    [
        {},  # contiguous, unfiltered
        {"chunks": True},  # h5py's own chunk guess
        {"chunks": True, "compression": "gzip", "compression_opts": 9},
        {"chunks": (5,), "shuffle": True, "fletcher32": True},
        {"chunks": (3,), "compression": "gzip", "shuffle": True, "fletcher32": True},
    ],
)
def test_legitimate_layouts_are_still_scored(challenge, tmp_path, options):
    out, good = challenge
    path = rewrite(tmp_path / "sub.h5", good, **options)
    assert score_submission(path, key_of(out)).metrics[0]["reid_accuracy"] == 1.0


def test_a_hard_link_loop_is_walked_once(challenge, tmp_path):
    out, good = challenge
    path = write_submission(tmp_path / "sub.h5", good)
    with h5py.File(path, "a") as handle:
        group = handle.create_group("notes")
        group["again"] = group
    assert score_submission(path, key_of(out)).metrics[0]["reid_accuracy"] == 1.0


def test_attack_tooling_reads_without_limits_but_with_the_layout_checks(challenge, tmp_path):
    out, good = challenge
    good = Submission(
        good.challenge_id,
        good.attack,
        good.attack_version,
        good.encoded_ids,
        mapping=good.mapping,
        reconstructions=np.zeros((N, 32, 32), np.float32),
    )
    assert read_submission(write_submission(tmp_path / "sub.h5", good)).reconstructions.shape == (N, 32, 32)
    with h5py.File(tmp_path / "sub.h5", "a") as handle:
        handle["scores"] = h5py.ExternalLink(str(key_of(out)), "/truth/plain_index")
    with pytest.raises(NcbenchError, match="external link"):
        read_submission(tmp_path / "sub.h5")


# -- the HDF5 primitives ------------------------------------------------------------------------------


def small_file(path, **attrs):
    with h5py.File(path, "w") as handle:
        handle.attrs["format"], handle.attrs["schema_version"] = "test", np.int64(1)
        for name, value in attrs.items():
            handle.attrs[name] = value
    return path


def test_a_chunk_inflating_past_its_declared_size_is_refused_after_one_chunk(tmp_path):
    path = small_file(tmp_path / "bomb.h5")
    squeezer = zlib.compressobj(9)
    bomb = b"".join(squeezer.compress(bytes(1 << 20)) for _ in range(64)) + squeezer.flush()  # 64 MiB of zeros
    with h5py.File(path, "a") as handle:
        dataset = handle.create_dataset(
            "values", shape=(256, 256), dtype="float64", chunks=(256, 256), compression="gzip"
        )  # one 512 kB chunk
        dataset.id.write_direct_chunk((0, 0), bomb)
    assert len(bomb) < 256 * 256 * 8  # the stored chunk is no larger than a legitimate one
    handle, datasets = open_untrusted(path, "test", 1)
    with handle, pytest.raises(NcbenchError, match="inflates beyond its declared 524,288 bytes"):
        check_chunks(handle["values"], datasets["values"], path)


@pytest.mark.parametrize("columns, accepted", [(16, True), (1, False)])
def test_chunks_beyond_a_million_are_accepted_only_as_blocks_of_a_row(tmp_path, columns, accepted):
    """A release's full-width encodings are 4 chunks a row; past 2^20 chunks a dataset may have up
    to 16 a row, and one of 32 a row is refused before anything is read."""
    path = small_file(tmp_path / "blocks.h5")
    rows = 300_000 if accepted else 70_000  # 1.2 million chunks of 16 channels, or 2.24 million of one
    with h5py.File(path, "a") as handle:  # declared only: no chunk is stored
        handle.create_dataset(
            "values", shape=(rows, 1, 64 if accepted else 32), dtype="float16", chunks=(1, 1, columns)
        )
    if accepted:
        handle, datasets = open_untrusted(path, "test", 1)
        handle.close()
        assert datasets["values"].chunks == (1, 1, 16)
    else:
        with pytest.raises(NcbenchError, match=r"cut into 2240000 chunks .* \(or 16 per row\)"):
            open_untrusted(path, "test", 1)


def test_strings_outside_the_datasets_are_bounded(tmp_path):
    path = small_file(tmp_path / "heap.h5", blob="x" * (MAX_METADATA_BYTES + (1 << 20)))
    with pytest.raises(NcbenchError, match="outside its datasets' data"):
        open_untrusted(path, "test", 1)


def test_file_size_is_checked_before_opening(tmp_path):
    path = tmp_path / "big.h5"
    path.write_bytes(b"\0" * 2048)  # not even HDF5: the size refuses it first
    with pytest.raises(NcbenchError, match="file is 2,048 bytes; at most 1,024 bytes"):
        open_untrusted(path, "test", 1, max_bytes=1024)


def test_sizes_read_exactly_when_small_and_roughly_when_large():
    assert format_bytes(1_048_584) == "1,048,584 bytes"
    assert format_bytes(int(3.2e9)) == "3.2 GB"
    assert format_bytes(1 << 62) == "4.6e+18 bytes"


def test_variable_length_arrays_are_refused_before_any_read(tmp_path):
    # Each element of a variable-length array may point at one shared large string: the declared
    # size (a pointer per element) says nothing of what reading it allocates.
    strings = h5py.string_dtype("utf-8")
    with h5py.File(tmp_path / "attr.h5", "w") as h5:
        h5.attrs["format"], h5.attrs["schema_version"] = "test", np.int64(1)
        h5.attrs.create("notes", ["x"] * 3, dtype=strings)
    with pytest.raises(NcbenchError, match="array of 3 variable-length elements"):
        open_untrusted(tmp_path / "attr.h5", "test", 1)
    with h5py.File(tmp_path / "data.h5", "w") as h5:
        h5.attrs["format"], h5.attrs["schema_version"] = "test", np.int64(1)
        h5.create_dataset("ids", data=np.array(["a", "b"], dtype=object), dtype=strings)
    with pytest.raises(NcbenchError, match="variable-length elements"):
        open_untrusted(tmp_path / "data.h5", "test", 1)


def test_scalar_string_attributes_and_fixed_strings_are_still_read(tmp_path):
    with h5py.File(tmp_path / "ok.h5", "w") as h5:
        h5.attrs["format"], h5.attrs["schema_version"] = "test", np.int64(1)
        h5.attrs["notes"] = "one string"
        h5.create_dataset("ids", data=np.array([b"a", b"b"], dtype="S1"))
    h5, datasets = open_untrusted(tmp_path / "ok.h5", "test", 1)
    with h5:
        assert h5.attrs["notes"] == "one string" and set(datasets) == {"ids"}


def test_an_unknown_10_mb_string_attribute_is_never_read(challenge, tmp_path, monkeypatch):
    """Only the attributes the format names are read; others cost their bytes on disk, under the
    metadata bound, and no allocation."""
    out, good = challenge
    path = write_submission(tmp_path / "padded.h5", good)
    with h5py.File(path, "a") as h5:
        h5.attrs["padding"] = "x" * (10 << 20)  # a scalar variable-length string
    read = []
    original = h5py.AttributeManager.__getitem__
    monkeypatch.setattr(
        h5py.AttributeManager, "__getitem__", lambda self, name: read.append(name) or original(self, name)
    )
    result = score_submission(path, out)
    assert result.headline() == 1.0
    assert "padding" not in read and "attack" in read  # the spy saw the reads it should


# -- uploads as the server stores them: under their sha256, with no suffix ----------------------------


def test_a_csv_stored_without_a_suffix_is_scored_like_the_same_csv_named_csv(challenge, tmp_path):
    out, good = challenge
    mapping = [good.mapping[1], good.mapping[0], *good.mapping[2:]]  # two answers swapped
    named = write_submission(tmp_path / "answer.csv", dataclasses.replace(good, mapping=mapping))
    stored = workqueue.StoreLayout(tmp_path / "store").upload(hashlib.sha256(named.read_bytes()).hexdigest())
    stored.parent.mkdir(parents=True)
    shutil.copyfile(named, stored)
    as_named, as_stored = score_submission(named, key_of(out)), score_submission(stored, key_of(out))
    assert as_stored.attack == "csv" and as_stored.headline() < 1.0
    assert dataclasses.asdict(as_stored) == dataclasses.asdict(as_named)


def test_random_bytes_without_a_suffix_are_refused_in_one_line_naming_no_server_path(challenge, tmp_path):
    out, _ = challenge
    layout = workqueue.StoreLayout(tmp_path / "store")
    junk = np.random.default_rng(0).bytes(4096)
    sha256 = hashlib.sha256(junk).hexdigest()
    layout.upload(sha256).parent.mkdir(parents=True)
    layout.upload(sha256).write_bytes(junk)
    with pytest.raises(NcbenchError) as refused:  # the scorer's child, as the server runs it
        isolated.score_isolated(layout.upload(sha256), key_of(out), None, died="the scorer died")
    assert channel.redact(str(refused.value), layout, sha256) == (
        "your file: not a submission (neither an HDF5 file nor a UTF-8 CSV)"
    )


def test_hdf5_is_told_by_its_signature_after_a_user_block_and_under_a_csv_name(challenge, tmp_path):
    out, good = challenge
    source_path = write_submission(tmp_path / "answer.h5", good)
    shifted = tmp_path / "answer.csv"
    with h5py.File(source_path, "r") as source, h5py.File(shifted, "w", userblock_size=512) as target:
        target.attrs.update(source.attrs)
        for name in source:
            source.copy(source[name], target, name)
    assert shifted.read_bytes()[512:520] == b"\x89HDF\r\n\x1a\n"
    result = score_submission(shifted, key_of(out))
    assert result.attack == "test-attack" and result.headline() == 1.0


# -- releases whose metadata is damaged ---------------------------------------------------------------


def damaged(release, path, marker: bytes, shift: int, length: int = 16):
    """A copy of ``release`` at ``path`` with ``length`` bytes of 0xff written ``shift`` bytes after
    the first ``marker`` (a signature of HDF5's structures, or a name), wherever the layout put it."""
    content = bytearray(release.read_bytes())
    at = content.index(marker) + shift
    content[at : at + length] = b"\xff" * length
    path.write_bytes(bytes(content))
    return path


# (marker, shift, what the damage hits, the commands that read it)
DAMAGE = [
    (b"challenge_id", -8, "root-attribute-message", ("info", "attack run")),
    (b"label_names", -8, "attribute-only-info-lists", ("info",)),
    (b"GCOL", 0, "global-heap-of-attribute-strings", ("info", "attack run")),
    (b"HEAP", 0, "local-heap-of-link-names", ("info", "attack run")),
    (b"SNOD", 0, "symbol-table-node", ("info", "attack run")),
    (b"TREE", 0, "group-b-tree", ("info", "attack run")),
    (b"TREE\x01", 64, "chunk-index-keys", ("info", "attack run")),  # node type 1; "bad coordinate offset"
]


@pytest.mark.parametrize(
    "command, marker, shift",
    [
        pytest.param(command, marker, shift, id=f"{hit}-{command.replace(' ', '-')}")
        for marker, shift, hit, commands in DAMAGE
        for command in commands
    ],
)
def test_a_release_with_damaged_metadata_is_one_error_line_never_a_traceback(
    challenge, tmp_path, command, marker, shift
):
    out, _ = challenge
    release = damaged(out / "public" / "release.h5", tmp_path / "release.h5", marker, shift)
    submission = tmp_path / "answer.h5"
    arguments = {
        "info": ["challenge", "info", str(release)],
        "attack run": ["attack", "run", "chance", "--release", str(release), "--out", str(submission)],
    }[command]
    result = CliRunner().invoke(main, arguments)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("checking ")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {release}"), lines  # `attack run` checks it first
    assert "Traceback" not in result.output
    assert not submission.exists()


def test_info_shows_a_name_that_is_not_utf8_as_text(challenge, tmp_path):
    out, _ = challenge
    release = damaged(out / "public" / "release.h5", tmp_path / "release.h5", b"plain\0", 0, length=4)
    result = CliRunner().invoke(main, ["challenge", "info", str(release)])
    assert result.exit_code == 0, result.output
    assert "\ufffd" * 4 + "n/ids" in json.loads(result.stdout)  # "plain" with its first 4 bytes replaced
