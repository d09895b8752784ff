"""Key material comes from at least 128 bits of secret entropy.

A guessable seed is refused unless the organizer asks for a test release, which then says in its
attributes and in `challenge info` that its key is public. No public value is a function of the
seed alone, and a secret seed still rebuilds the same files.
"""

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import encode_all

from ncbench.challenge.encoders import Encoder, derive_seed, resolve_config, sample_key
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, _halves, build_release
from ncbench.cli import main
from ncbench.errors import NcbenchError

torch.set_num_threads(1)
# linear: no BatchNorm and no shuffle, so one image's encoding checks a guessed key on its own.
LINEAR = resolve_config("linear", width=16, image_size=16, patch_size=4, bn_batch=8)
N = 8
SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2  # 256 bits
CLI_ARGS = [
    "--preset",
    "linear",
    "--source",
    "phantom",
    "--n",
    N,
    "--width",
    16,
    "--image-size",
    16,
    "--patch-size",
    4,
    "--bn-batch",
    8,
    "--device",
    "cpu",
]


def _build(out, **kwargs):
    return build_release(
        out, config=LINEAR, plan=BuildPlan.for_task("reid", N), source="phantom", device="cpu", **kwargs
    )


def _run(*args, env=None, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def guess_seed(release_dir, candidates) -> int | None:
    """The enumeration attack: try small seeds against what the release publishes.

    A candidate wins when the public id is the one it would derive, or when a key drawn from it
    encodes a public plaintext into one of the public encodings.
    """
    with open_release(release_dir) as release:
        challenge_id, plain, encoded = release.challenge_id, release.plain_images[:1], release.encoded[()]
    encoded = encoded.astype(np.float32)
    for seed in candidates:
        if challenge_id.endswith(f"-{derive_seed(seed, 'challenge-id') % 16**8:08x}"):
            return seed
        guess = encode_all(Encoder(LINEAR, sample_key(LINEAR, seed)), plain, None)[0]
        error = np.abs(encoded - guess).max(axis=(1, 2)) / np.maximum(np.abs(guess).max(), 1.0)
        if error.min() < 2e-3:
            return seed
    return None


# -- the attack ---------------------------------------------------------------------------------


def test_guessing_small_seeds_recovers_a_test_release_key(tmp_path):
    out = _build(tmp_path / "test", seed=7, test_release=True)
    found = guess_seed(out, range(64))
    assert found == 7  # the attack works: a test release's key is public, as it says
    with open_key(out) as key:
        tensors, split = key.tensors(), key.read("truth/split")
    for name, values in sample_key(LINEAR, found).items():
        assert np.array_equal(values.numpy(), tensors[name]), name
    assert np.array_equal(_halves(N, np.random.default_rng(derive_seed(found, "split"))), split)


def test_guessing_small_seeds_fails_against_a_default_build(tmp_path):
    out = _build(tmp_path / "default")
    assert guess_seed(out, range(512)) is None
    with open_key(out) as key:
        assert len(key.seed) == 64 and int(key.seed, 16) >= 0  # 256 bits drawn from `secrets`


def test_two_default_builds_share_no_key_material(tmp_path):
    a, b = _build(tmp_path / "a"), _build(tmp_path / "b")
    with open_key(a) as key_a, open_key(b) as key_b:
        assert key_a.seed != key_b.seed and key_a.challenge_id != key_b.challenge_id
        assert not np.array_equal(key_a.read("commitment/salt"), key_b.read("commitment/salt"))


def test_test_release_salt_and_id_are_fresh_not_derived_from_its_seed(tmp_path):
    a, b = _build(tmp_path / "a", seed=7, test_release=True), _build(tmp_path / "b", seed=7, test_release=True)
    with open_key(a) as key_a, open_key(b) as key_b:
        assert np.array_equal(key_a.read("encoder/stem.weight"), key_b.read("encoder/stem.weight"))
        assert not np.array_equal(key_a.read("commitment/salt"), key_b.read("commitment/salt"))
        assert key_a.challenge_id != key_b.challenge_id


# -- the API ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, "7", "ab" * 15, b"\x01" * 15])
def test_weak_seed_is_refused_without_test_release(tmp_path, seed):
    with pytest.raises(NcbenchError, match="can be guessed"):
        _build(tmp_path / "out", seed=seed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [b"\x01" * 16, "AB" * 16, SECRET])
def test_secret_seed_of_128_bits_or_more_is_accepted(tmp_path, seed):
    out = _build(tmp_path / "out", seed=seed)
    with open_release(out) as release, open_key(out) as key:
        assert not release.test_release and "test_release" not in release.h5.attrs
        assert key.seed == (seed.hex() if isinstance(seed, bytes) else seed.lower())


def test_seed_that_is_not_hex_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(NcbenchError, match="hex digits") as refused:
        _build(tmp_path / "out", seed="correct horse battery staple, my secret")
    assert "horse" not in str(refused.value)


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_weak_seed_is_refused_in_one_line(tmp_path):
    line = _one_line_error(
        _run("challenge", "build", *CLI_ARGS, "--seed-file", "-", "--out", tmp_path / "out", input="7")
    )
    assert "can be guessed" in line and "--test-release" in line
    assert not (tmp_path / "out").exists()


def test_cli_seed_of_31_hex_digits_is_refused(tmp_path):
    _one_line_error(
        _run("challenge", "build", *CLI_ARGS, "--seed-file", "-", "--out", tmp_path / "out", input="f" * 31)
    )
    assert not (tmp_path / "out").exists()


def test_cli_seed_file_builds_reproducibly(tmp_path):
    seed_file = tmp_path / "seed.hex"
    seed_file.write_text(SECRET + "\n")
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    for name in ("a", "b"):
        result = _run("challenge", "build", *CLI_ARGS, "--seed-file", seed_file, "--out", tmp_path / name, env=env)
        assert result.exit_code == 0, result.output
    same_seed_on_standard_input = _run(
        "challenge", "build", *CLI_ARGS, "--seed-file", "-", "--out", tmp_path / "c", env=env, input=SECRET + "\n"
    )
    assert same_seed_on_standard_input.exit_code == 0, same_seed_on_standard_input.output
    for rel in ("public/release.h5", "private/key.h5"):
        assert (
            (tmp_path / "a" / rel).read_bytes()
            == (tmp_path / "b" / rel).read_bytes()
            == (tmp_path / "c" / rel).read_bytes()
        )
    with open_key(tmp_path / "a") as key:
        assert key.seed == SECRET
    assert SECRET.encode() not in (tmp_path / "a/public/release.h5").read_bytes()


@pytest.mark.parametrize("content", ["abc\n", "é" * 40, "0" * 5000])
def test_cli_bad_seed_file_is_refused_in_one_line(tmp_path, content):
    seed_file = tmp_path / "seed.hex"
    seed_file.write_text(content)
    _one_line_error(_run("challenge", "build", *CLI_ARGS, "--seed-file", seed_file, "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_missing_seed_file_is_one_line(tmp_path):
    _one_line_error(_run("challenge", "build", *CLI_ARGS, "--seed-file", tmp_path / "nope", "--out", tmp_path / "o"))


@pytest.mark.parametrize("seed", [SECRET, "0" * 30 + "07", "deadbeef" * 8])
def test_a_typed_seed_builds_no_real_release(tmp_path, seed):
    # Digit count is not entropy, and a command line is public: a real key comes from `secrets`
    # or a seed file; a typed seed is for a test release, which says its key is public.
    line = _one_line_error(_run("challenge", "build", *CLI_ARGS, "--seed", seed, "--out", tmp_path / "out"))
    assert "--seed-file" in line and "--test-release" in line
    assert not (tmp_path / "out").exists()
    marked = _run("challenge", "build", *CLI_ARGS, "--seed", seed, "--test-release", "--out", tmp_path / "t")
    assert marked.exit_code == 0, marked.output


def test_cli_seed_and_seed_file_together_are_refused(tmp_path):
    seed_file = tmp_path / "seed.hex"
    seed_file.write_text(SECRET)
    line = _one_line_error(
        _run("challenge", "build", *CLI_ARGS, "--seed", SECRET, "--seed-file", seed_file, "--out", tmp_path / "out")
    )
    assert "not both" in line


def test_cli_test_release_is_marked_in_attributes_and_info(tmp_path):
    out = tmp_path / "out"
    built = _run("challenge", "build", *CLI_ARGS, "--seed", 7, "--test-release", "--out", out)
    assert built.exit_code == 0, built.output
    assert "TEST RELEASE" in built.stderr
    with h5py.File(out / "public/release.h5", "r") as h5:
        assert int(h5.attrs["test_release"]) == 1
    with open_release(out) as release, open_key(out) as key:
        assert release.test_release and key.test_release
    info = _run("challenge", "info", out)
    assert info.exit_code == 0, info.output
    assert '"test_release": 1' in info.stdout and "TEST RELEASE" in info.stderr and "key is public" in info.stderr
    verified = _run("challenge", "verify", out, "--key", out)
    assert verified.exit_code == 0 and "TEST RELEASE" in verified.stderr


def test_cli_default_build_is_not_a_test_release(tmp_path):
    out = tmp_path / "out"
    assert _run("challenge", "build", *CLI_ARGS, "--out", out).exit_code == 0
    with h5py.File(out / "public/release.h5", "r") as h5:
        assert "test_release" not in h5.attrs
    info = _run("challenge", "info", out)
    assert "test_release" not in info.stdout and "TEST RELEASE" not in info.stderr
