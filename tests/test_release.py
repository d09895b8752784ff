"""Challenge releases (docs/format.md): build, verify, tamper detection, role discipline, secrecy, CLI."""

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import png_folder

import ncbench.attacks.plugins.runner as runner_module
import ncbench.challenge.release as release_module
from ncbench.challenge.encoders import Encoder, key_tensor_names, resolve_config
from ncbench.challenge.files import (
    KEY_FORMAT,
    RELEASE_FORMAT,
    SCHEMA_VERSION,
    open_key,
    open_release,
)
from ncbench.challenge.release import BuildPlan, build_release, write_sha256sums
from ncbench.challenge.verify import _compare, _tensor, verify
from ncbench.cli import main
from ncbench.errors import NcbenchError

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)
N = 16
N_PATCHES = (32 // 8) ** 2
SEED = "9f3c2a7b41d0e8c6" * 4  # a secret seed: 256 bits of hex, long enough never to appear by chance
OTHER_SEED = "5e" * 32
PLANS = {
    "reid": BuildPlan.for_task("reid", N),
    "transfer": BuildPlan.for_task("transfer", N, n_aux=6, n_targets=4),
    "invert": BuildPlan.for_task("invert", N, n_known=5),
}


def _build(out, task="reid", seed=SEED, n=None, **kwargs):
    plan = PLANS[task] if n is None else BuildPlan.for_task(task, n)
    return build_release(out, config=TINY, plan=plan, source="phantom", seed=seed, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {task: _build(root / task, task) for task in PLANS}


@pytest.fixture(scope="module")
def other_reid(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("other") / "reid", "reid", seed=OTHER_SEED)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- layout, attributes, shapes ---------------------------------------------------------------


@pytest.mark.parametrize("task", list(PLANS))
def test_build_writes_public_and_private_files(built, task):
    out = built[task]
    for rel in ("public/release.h5", "public/SHA256SUMS", "private/key.h5", "private/SHA256SUMS"):
        assert (out / rel).is_file(), rel
    assert sorted(p.name for p in (out / "public").iterdir()) == ["SHA256SUMS", "release.h5"]
    assert "release.h5" in (out / "public/SHA256SUMS").read_text()
    assert "key.h5" in (out / "private/SHA256SUMS").read_text()


@pytest.mark.parametrize("task", list(PLANS))
def test_release_root_attributes_follow_spec(built, task):
    with h5py.File(built[task] / "public/release.h5", "r") as h5:
        attrs = dict(h5.attrs)
    with open_key(built[task]) as key:
        commitment, challenge_id = key.commitment(), key.challenge_id
    assert attrs["format"] == RELEASE_FORMAT
    assert int(attrs["schema_version"]) == SCHEMA_VERSION == 1
    assert attrs["challenge_id"] == challenge_id and attrs["challenge_id"].startswith(f"nc7-{task}-")
    assert attrs["task"] == task
    assert attrs["preset"] == "nc7"
    assert json.loads(attrs["encoder_config"]) == json.loads(TINY.to_json())
    assert int(attrs["n_encoded"]) == N
    assert re.fullmatch(r"[0-9a-f]{64}", attrs["key_commitment"]) and attrs["key_commitment"] == commitment
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attrs["created_utc"])
    assert isinstance(attrs["source"], str) and attrs["source"]
    assert str(built[task].parent) not in attrs["source"]


def test_key_file_format(built):
    with h5py.File(built["reid"] / "private/key.h5", "r") as h5:
        assert h5.attrs["format"] == KEY_FORMAT
        assert int(h5.attrs["schema_version"]) == SCHEMA_VERSION
        assert sorted(h5["encoder"]) == sorted(key_tensor_names(TINY))
        assert h5["truth/patch_perm"].shape == (N, N_PATCHES)


@pytest.mark.parametrize("task", list(PLANS))
def test_dataset_shapes_and_default_dtype(built, task):
    plan = PLANS[task]
    with open_release(built[task]) as rel:
        h5 = rel.h5
        assert h5["encoded/data"].shape == (N, N_PATCHES, 32)
        assert h5["encoded/data"].dtype == np.float16
        assert h5["encoded/ids"].shape == (N,)
        assert h5["encoded/labels"].dtype == np.int8 and h5["encoded/labels"].shape[0] == N
        m = {"reid": N, "transfer": plan.n_aux, "invert": plan.n_known}[task]
        assert h5["plain/images"].shape == (m, 32, 32) and h5["plain/images"].dtype == np.uint8
        assert h5["plain/ids"].shape == (m,)
        if task == "transfer":
            assert h5["target/images"].shape == (plan.n_targets, 32, 32)
            assert h5["target/ids"].shape == (plan.n_targets,)
        else:
            assert "target" not in h5
        if task == "invert":
            assert h5["pairs/encoded_ids"].shape == (plan.n_known,)
        else:
            assert "pairs" not in h5


# -- verify and tampering ---------------------------------------------------------------------


@pytest.mark.parametrize("task", list(PLANS))
def test_verify_fresh_build_is_clean(built, task):
    assert verify(built[task], built[task]) == []
    assert verify(built[task]) == []


def test_flipped_byte_in_data_region_detected(built, tmp_path):
    out = _copy(built["reid"], tmp_path)
    path = out / "public/release.h5"
    with h5py.File(path, "r") as h5:
        info = h5["encoded/data"].id.get_chunk_info(3)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = verify(out, out)
    text = "\n".join(problems)
    assert "sha256 does not match SHA256SUMS" in text
    assert "not the file this key was issued with" in text
    assert "corrupt" in text or "differ" in text


def test_encodings_read_last_block_first_are_the_same_blocks(built):
    with open_release(built["reid"]) as release:
        forward = list(release.iter_encoded(5))
        backward = list(release.iter_encoded(5, reverse=True))
        site = release.site(0)
        site_backward = list(site.iter_encoded(5, reverse=True))
    assert [start for start, _ in backward] == [start for start, _ in forward][::-1]
    assert len(forward) > 2 and len(forward[-1][1]) < 5  # a short last block, read first
    for (_, block), (_, again) in zip(forward[::-1], backward):
        np.testing.assert_array_equal(block, again)
    assert [start for start, _ in site_backward] == [start for start, _ in backward]


def test_a_full_width_release_keeps_its_channels_in_blocks_that_are_read_apart(tmp_path):
    """Wider than 512 channels, each encoding is stored in blocks of 512: a reader of the first
    512 inflates those only (a damaged later block goes unread), and verify reads them all."""
    plan = BuildPlan.for_task("reid", 16)
    wide = resolve_config("nc7", width=1024, image_size=32, patch_size=8, bn_batch=8)
    out = build_release(tmp_path / "wide", config=wide, plan=plan, source="phantom", seed=SEED, device="cpu")
    assert verify(out, out) == []
    path = out / "public/release.h5"
    with h5py.File(path, "r") as h5:
        assert h5["encoded/data"].chunks == (1, N_PATCHES, release_module.ENCODED_BLOCK_CHANNELS)
        info = h5["encoded/data"].id.get_chunk_info_by_coord((3, 0, 512))
    with open_release(out) as release:
        whole = release.encoded_rows(np.arange(16))
        np.testing.assert_array_equal(release.encoded_rows([5, 3, 5], channels=512), whole[[5, 3, 5], :, :512])
        blocks = list(release.site(0).iter_encoded(6, channels=300))
    np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), whole[..., :300])
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_release(out) as release:
        np.testing.assert_array_equal(release.encoded_rows(np.arange(16), channels=512), whole[..., :512])
        with pytest.raises(NcbenchError, match="encoded/data is corrupt"):
            release.encoded_rows(np.arange(16))
    assert any("corrupt" in problem or "differ" in problem for problem in verify(out, out))


def test_attack_reading_a_damaged_chunk_gets_one_line(built, tmp_path):
    out = _copy(built["reid"], tmp_path)
    with h5py.File(out / "public/release.h5", "r+") as h5:
        dataset = h5["encoded/data"]
        stored = bytearray(dataset.id.read_direct_chunk((1, 0, 0))[1])
        stored[10] ^= 0x01
        dataset.id.write_direct_chunk((1, 0, 0), bytes(stored))
    with open_release(out) as release:
        with pytest.raises(NcbenchError, match=r"encoded/data is corrupt \(") as raised:
            list(release.iter_encoded(4))
    assert "\n" not in str(raised.value)


def test_rewritten_encoding_with_regenerated_sums_detected(built, tmp_path):
    out = _copy(built["reid"], tmp_path)
    with h5py.File(out / "public/release.h5", "r+") as h5:
        h5["encoded/data"][5, 2, 7] = h5["encoded/data"][5, 2, 7] + np.float16(1.0)
    write_sha256sums(out / "public")
    assert verify(out) == []  # checksums alone cannot see it
    text = "\n".join(verify(out, out))
    assert "not the file this key was issued with" in text
    assert "encoded/data: encodings differ" in text


@pytest.mark.parametrize("version, explained", [("0.1.0", True), ("0.2.0", False), ("not a version", False)])
def test_differing_encodings_of_a_release_before_exact_products_say_why(built, tmp_path, version, explained):
    out = _copy(built["reid"], tmp_path)
    with h5py.File(out / "public/release.h5", "r+") as h5:
        h5["encoded/data"][5, 2, 7] = h5["encoded/data"][5, 2, 7] + np.float16(1.0)
        h5.attrs["ncbench_version"] = version
    text = "\n".join(verify(out, out))
    assert "encoded/data: encodings differ" in text
    assert ("written before ncbench 0.2.0" in text) == explained
    assert version not in text


def test_modified_key_tensor_breaks_commitment(built, tmp_path):
    out = _copy(built["invert"], tmp_path)
    with h5py.File(out / "private/key.h5", "r+") as h5:
        h5["encoder/stem.weight"][0, 0] = h5["encoder/stem.weight"][0, 0] + 0.5
    write_sha256sums(out / "private")
    text = "\n".join(verify(out, out))
    assert "key commitment does not match" in text


def test_wrong_key_for_release(built, other_reid):
    problems = verify(built["reid"], other_reid)
    assert len(problems) == 1 and problems[0].startswith("key is for challenge")


# -- roles ------------------------------------------------------------------------------------


def _rows(images):
    return {img.tobytes() for img in images}


def test_transfer_roles_disjoint(built):
    with open_release(built["transfer"]) as rel, open_key(built["transfer"]) as key:
        encoded, aux, targets = _rows(key.read("truth/images")), _rows(rel.plain_images), _rows(rel.target_images)
    assert len(encoded) == N and len(aux) == 6 and len(targets) == 4
    assert not encoded & aux and not encoded & targets and not aux & targets


def test_invert_known_pairs_are_subset_with_matching_plaintexts(built):
    with open_release(built["invert"]) as rel, open_key(built["invert"]) as key:
        ids, pairs = rel.encoded_ids, rel.pair_encoded_ids
        assert set(pairs) <= set(ids) and len(set(pairs)) == len(pairs) == 5
        rows = [ids.index(i) for i in pairs]
        assert np.array_equal(key.read("truth/images")[rows], rel.plain_images)


def test_reid_plain_pool_is_permutation_of_encoded(built):
    with open_release(built["reid"]) as rel, open_key(built["reid"]) as key:
        index = key.read("truth/plain_index")
        assert sorted(index.tolist()) == list(range(N))
        encoder = Encoder(key.config, {k: _tensor(v) for k, v in key.tensors().items()})
        perms, batch = key.read("truth/patch_perm"), key.read("truth/batch")
        plain = rel.plain_images
        sites = np.zeros(N, np.int64)
        assert _compare([encoder], sites, plain[index], perms, batch, rel.encoded, "encoded/data") == []
        assert _compare([encoder], sites, plain[np.roll(index, 1)], perms, batch, rel.encoded, "encoded/data") != []


# -- reproducibility and randomness ------------------------------------------------------------


def test_same_seed_gives_identical_bytes_different_seed_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b, c = (_build(tmp_path / name, seed=s, n=8) for name, s in (("a", SEED), ("b", SEED), ("c", OTHER_SEED)))
    rel = "public/release.h5"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "private/key.h5").read_bytes() == (b / "private/key.h5").read_bytes()
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_default_seed_is_random(tmp_path):
    commitments = []
    for name in ("a", "b"):
        out = build_release(
            tmp_path / name, config=TINY, plan=BuildPlan.for_task("reid", 4), source="phantom", device="cpu"
        )
        with open_release(out) as rel:
            commitments.append(rel.h5.attrs["key_commitment"])
    assert commitments[0] != commitments[1]


# -- atomic output ----------------------------------------------------------------------------


def test_existing_output_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(NcbenchError, match="already exists"):
        _build(out, n=4)
    assert (out / "marker").exists()


def test_an_earlier_release_is_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    _build(out, n=4)
    (out / "public" / "marker").write_text("old")
    _build(out, n=4, force=True)
    assert not (out / "public" / "marker").exists()
    assert verify(out, out) == []


@pytest.mark.parametrize("where", ["foreign folder", "current directory", "folder above", "file"])
def test_force_never_replaces_what_a_build_did_not_write(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    (work / "keep").mkdir(parents=True)
    (work / "keep" / "file").write_text("mine")
    monkeypatch.chdir(work / "keep")
    out = {"foreign folder": work, "current directory": Path("."), "folder above": Path(".."), "file": Path("file")}
    with pytest.raises(NcbenchError, match="not replacing it"):
        _build(out[where], n=4, force=True)
    assert (work / "keep" / "file").read_text() == "mine"


def test_sigterm_mid_build_removes_the_temporary_release_and_says_terminated(tmp_path):
    """A build stopped by SIGTERM (``timeout``, a supervisor) ends in one line, status 143, and
    leaves neither the release nor its hidden temporary sibling behind."""
    out = tmp_path / "out"
    build = subprocess.Popen(
        [
            Path(sys.executable).with_name("ncbench"),
            "challenge",
            "build",
            "--preset",
            "nc7",
            "--n",
            "2048",
            "--out",
            out,
        ]
        + ["--test-release", "--source", "phantom", "--width", "512", "--image-size", "64", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*")) and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(release_module, "_encode_into", boom)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        _build(parent / "out", n=4)
    assert list(parent.iterdir()) == []


# -- secrecy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(PLANS))
def test_seed_not_in_release(built, task):
    raw = (built[task] / "public/release.h5").read_bytes()
    assert str(SEED).encode() not in raw
    with h5py.File(built[task] / "public/release.h5", "r") as h5:
        texts = [str(v) for v in h5.attrs.values()]
        h5.visititems(lambda name, obj: texts.extend(str(v) for v in obj.attrs.values()))
    assert not any(str(SEED) in t for t in texts)


@pytest.mark.parametrize("task", list(PLANS))
def test_key_tensor_bytes_not_in_release(built, task):
    raw = (built[task] / "public/release.h5").read_bytes()
    with open_key(built[task]) as key:
        tensors = key.tensors()
    for name, values in tensors.items():
        needle = np.ascontiguousarray(values.reshape(-1)[:16], dtype=np.float32).tobytes()
        assert needle not in raw, name


def test_key_describe_hides_seed_unless_asked(built):
    with open_key(built["reid"]) as key:
        hidden, shown = key.describe(), key.describe(secrets=True)
    assert "seed" not in hidden["encoder"].get("attrs", {})
    assert str(SEED) not in json.dumps(hidden, default=str)
    assert shown["encoder"]["attrs"]["seed"] == SEED


def test_cli_info_key_hides_seed(built):
    result = _run("challenge", "info", built["reid"] / "private/key.h5")
    assert result.exit_code == 0
    assert str(SEED) not in result.output
    result = _run("challenge", "info", built["reid"] / "private/key.h5", "--show-secrets")
    assert str(SEED) in result.output


# -- CLI --------------------------------------------------------------------------------------

TINY_ARGS = ["--width", 32, "--image-size", 32, "--patch-size", 8, "--bn-batch", 8, "--device", "cpu"]


def _assert_one_line_error(result):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output


def _build_tiny(out, *args):
    return _run("challenge", "build", "--preset", "nc7", *args, "--out", out, *TINY_ARGS)


def test_cli_build_too_many_images_for_folder(tmp_path):
    folder = png_folder(tmp_path / "imgs", 2, 32)
    result = _build_tiny(tmp_path / "out", "--source", f"folder:{folder}", "--n", 5)
    _assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_cli_build_on_a_full_disk_is_one_line_and_keeps_nothing(tmp_path, monkeypatch):
    calls = []

    def full_disk(dataset, start, values):
        calls.append(start)
        if len(calls) > 2:  # the key and the plaintexts are written; the encodings are not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(dataset, start, values)

    real = release_module.write_rows
    monkeypatch.setattr(release_module, "write_rows", full_disk)
    result = _build_tiny(tmp_path / "out", "--source", "phantom", "--n", 16, "--test-release", "--seed", 3)
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("error:") and "the disk filled up" in last and "nothing was kept" in last
    assert list(tmp_path.iterdir()) == []  # neither the release nor its temporary folder


def test_any_command_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    def full_disk(out, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(release_module, "build_release", full_disk)
    result = _run("challenge", "build", "--preset", "nc7", "--n", 4, "--test-release", "--out", tmp_path / "out")
    _assert_one_line_error(result)
    assert result.exit_code == 2 and f"no space left on the device writing {tmp_path / 'out'}" in result.output


def test_a_submission_written_to_a_full_disk_says_so_in_one_line(built, tmp_path, monkeypatch):
    def full_disk(path, submission, **kwargs):  # what h5py raises, HDF5's internals in its text
        raise RuntimeError(
            f"Can't write data (file write failed: filename = '{path}.tmp', errno = 28, "
            "error message = 'No space left on device', buf = 0x55d0c0ffee00)"
        )

    monkeypatch.setattr(runner_module, "write_submission", full_disk)
    out = tmp_path / "sub.h5"
    result = _run("attack", "run", "chance", "--release", built["reid"], "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and last.endswith("RuntimeError: no space left on the device")
    assert "0x" not in last and ".tmp" not in last and not out.exists()


def test_cli_build_refuses_a_key_wider_than_memory_before_drawing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(release_module, "available_memory", lambda: 1 << 30)
    result = _run("challenge", "build", "--preset", "nc7", "--width", 8192, "--n", 4, "--test-release", "--seed", 1,
                  "--out", tmp_path / "out")  # fmt: skip
    _assert_one_line_error(result)
    assert "the nc7 key of width 8192 and the encoder's copy of it take 2.7 GB" in result.output
    assert "1.1 GB of memory available" in result.output and not (tmp_path / "out").exists()


def test_cli_build_missing_folder(tmp_path):
    result = _run(
        "challenge",
        "build",
        "--preset",
        "nc7",
        "--source",
        f"folder:{tmp_path / 'nope'}",
        "--n",
        4,
        "--out",
        tmp_path / "out",
        *TINY_ARGS,
    )
    _assert_one_line_error(result)
    assert "does not exist" in result.output


def test_cli_build_unknown_preset_is_a_one_line_usage_error(tmp_path):
    result = _run("challenge", "build", "--preset", "nc999", "--n", 4, "--out", tmp_path / "out")
    _assert_one_line_error(result)
    assert "Usage:" not in result.output and "nc999" in result.output


def test_cli_info_release_prints_json(built):
    result = _run("challenge", "info", built["transfer"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    with open_release(built["transfer"]) as rel:
        assert info["attrs"]["challenge_id"] == rel.challenge_id


def test_cli_info_random_bytes_fails_with_one_line(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line_error(_run("challenge", "info", path))


def test_cli_verify_exit_codes(built, tmp_path):
    good = _run("challenge", "verify", built["reid"], "--key", built["reid"])
    assert good.exit_code == 0 and good.output.strip().splitlines()[-1].startswith("OK ")
    out = _copy(built["reid"], tmp_path)
    with h5py.File(out / "public/release.h5", "r+") as h5:
        h5["encoded/data"][0, 0, 0] = h5["encoded/data"][0, 0, 0] + np.float16(2.0)
    write_sha256sums(out / "public")
    bad = _run("challenge", "verify", out, "--key", out)
    assert bad.exit_code == 1
    assert "FAIL" in bad.output


# -- BuildPlan --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(PLANS))
def test_plan_needs_at_least_two(task):
    with pytest.raises(NcbenchError, match="at least 2"):
        BuildPlan.for_task(task, 1)


def test_plan_invert_known_must_be_below_n():
    with pytest.raises(NcbenchError, match="n-known"):
        BuildPlan.for_task("invert", 8, n_known=8)
    with pytest.raises(NcbenchError, match="n-known"):
        BuildPlan.for_task("invert", 8, n_known=9)


def test_plan_transfer_needs_two_targets():
    with pytest.raises(NcbenchError, match="n-targets"):
        BuildPlan.for_task("transfer", 8, n_targets=1)
