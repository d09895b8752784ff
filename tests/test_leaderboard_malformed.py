"""Property test: every malformed or hostile submission is refused by `ncbench score` with one
clean line, exit code 2, no other exception, and the database left exactly as it was.

Hostile files: declared-huge datasets, compression bombs, links, virtual datasets and
external storage reaching the private key, odd filters and chunks, oversized attributes and CSVs.
"""

import csv
import hashlib
import io
import json
import math
import os
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.leaderboard.store import Store

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)
N, P, D, SIZE = 12, 16, 32, 32
CHECKED: set[tuple[str, str]] = set()  # (case kind, sha256 of the file): distinct malformed inputs seen


class World:
    """Tiny releases of the three tasks, their truths, and a database holding one valid submission."""

    def __init__(self, root: Path):
        self.dirs, self.ids, self.plain_ids, self.target_ids, self.challenge = {}, {}, {}, {}, {}
        for task in ("reid", "invert", "transfer"):
            out = root / task
            build_release(
                out,
                config=TINY,
                plan=BuildPlan.for_task(task, N),
                source="phantom",
                seed=7,
                test_release=True,
                device="cpu",
            )
            with open_release(out) as release, open_key(out) as key:
                self.dirs[task] = out
                self.ids[task] = release.encoded_ids
                self.plain_ids[task] = release.plain_ids
                self.target_ids[task] = release.target_ids if task == "transfer" else []
                self.challenge[task] = release.challenge_id
                if task == "reid":
                    self.mapping = [release.plain_ids[j] for j in key.read("truth/plain_index")]
        self.db = root / "board.db"
        good = write_submission(root / "good.h5", self.submission("reid", mapping=self.mapping))
        result = run(["score", str(good), "--key", str(self.key("reid")), "--db", str(self.db), "--team", "alice"])
        assert result.exit_code == 0, result.output
        with Store(self.db) as store:
            self.counts = store.counts()

    def key(self, task):
        return self.dirs[task] / "private" / "key.h5"

    def submission(self, task, **parts):
        return Submission(self.challenge[task], "test-attack", "1.0", list(self.ids[task]), **parts)

    def attrs(self, task, **overrides):
        attrs = {
            "format": "ncbench-submission",
            "schema_version": 1,
            "ncbench_version": "0.1.0",
            "challenge_id": self.challenge[task],
            "attack": "test-attack",
            "attack_version": "1.0",
            "params": "{}",
            "knowledge": "[]",
            "runtime_s": 1.0,
        }
        attrs.update(overrides)
        return {k: v for k, v in attrs.items() if v is not None}


def run(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("malformed"))


def write_h5(path: Path, attrs: dict, datasets: dict, **options) -> Path:
    """An HDF5 file written with h5py directly, so that it can break every rule."""
    with h5py.File(path, "w", **options) as handle:
        for name, value in attrs.items():
            handle.attrs[name] = value
        for name, value in datasets.items():
            if isinstance(value, list):
                value = np.array([str(v).encode() for v in value], dtype="S") if value else np.zeros(0, "S1")
            handle.create_dataset(name, data=value)
    return path


# -- case strategies: each draws (kind, task, writer(directory) -> path of the file written) --------

ids_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12)


def _write_bytes(path, content):
    path.write_bytes(content)
    return path


@st.composite
def random_bytes(draw, world, suffix):
    content = draw(st.binary(min_size=0, max_size=2048))
    return "reid", lambda d: _write_bytes(d / f"sub{suffix}", content)


@st.composite
def truncated(draw, world):
    cut = draw(st.integers(0, 1 << 20))

    def writer(d):
        full = write_submission(d / "full.h5", world.submission("reid", mapping=world.mapping)).read_bytes()
        return _write_bytes(d / "sub.h5", full[: cut % len(full)])

    return "reid", writer


@st.composite
def bad_csv(draw, world, kind):
    ids, mapping = world.ids["reid"], world.mapping
    rows = [list(r) for r in zip(ids, mapping)]
    header = "encoded_id,plain_id"
    i = draw(st.integers(0, N - 1))
    if kind == "header":
        header = draw(ids_text.filter(lambda h: [c.strip() for c in h.split(",")] != ["encoded_id", "plain_id"]))
    elif kind == "columns":
        extra = draw(st.lists(ids_text, min_size=0, max_size=3))
        rows[i] = rows[i] + extra if extra else rows[i][:1]
    elif kind == "unknown-plain":
        rows[i][1] = draw(ids_text.filter(lambda t: t.strip() not in world.plain_ids["reid"]))
    elif kind == "unknown-encoded":
        rows[i][0] = draw(ids_text.filter(lambda t: t.strip() not in ids))
    elif kind == "missing":
        del rows[i]
    elif kind == "duplicate":
        rows.append(list(rows[i]))
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    text = header + "\n" + buffer.getvalue()
    return "reid", lambda d: _write_bytes(d / "sub.csv", text.encode("utf-8"))


@st.composite
def bad_attrs(draw, world, kind):
    if kind == "format":
        overrides = {"format": draw(ids_text.filter(lambda f: f != "ncbench-submission"))}
    elif kind == "schema":
        overrides = {"schema_version": draw(st.integers(-5, 50).filter(lambda v: v != 1))}
    elif kind == "challenge":
        overrides = {"challenge_id": draw(ids_text.filter(lambda c: c != world.challenge["reid"]))}
    elif kind == "oracle":
        overrides = {"attack": draw(st.sampled_from(["oracle", "Oracle", " oracle "]))}
    elif kind == "key-knowledge":
        overrides = {"knowledge": json.dumps(draw(st.lists(st.sampled_from(["architecture", "labels"]))) + ["key"])}
    elif kind == "no-attack":
        overrides = {"attack": None}
    elif kind == "no-challenge":
        overrides = {"challenge_id": None}
    elif kind == "params-json":
        overrides = {"params": draw(ids_text.filter(lambda t: not _is_json(t)))}
    elif kind == "params-type":
        overrides = {"params": json.dumps(draw(st.sampled_from([[1, 2], 3, "x", None, True])))}
    elif kind == "knowledge-type":
        overrides = {"knowledge": json.dumps(draw(st.sampled_from([{"a": 1}, 5, [1, 2], [None], 2.5])))}
    else:  # runtime
        overrides = {"runtime_s": draw(st.sampled_from([float("nan"), float("inf"), -1.0, "fast"]))}
    datasets = {"encoded_ids": world.ids["reid"], "mapping": world.mapping}
    return "reid", lambda d: write_h5(d / "sub.h5", world.attrs("reid", **overrides), datasets)


def _is_json(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@st.composite
def bad_ids(draw, world, kind):
    ids, mapping = list(world.ids["reid"]), list(world.mapping)
    datasets = {"encoded_ids": ids, "mapping": mapping}
    i = draw(st.integers(0, N - 1))
    if kind == "unknown":
        ids[i] = draw(ids_text.filter(lambda t: t not in world.ids["reid"]))
    elif kind == "missing":
        del ids[i], mapping[i]
    elif kind == "duplicate":
        ids[i] = ids[(i + 1) % N]
    elif kind == "mapping-length":
        datasets["mapping"] = mapping[: draw(st.integers(0, N - 1))]
    elif kind == "unknown-plain":
        mapping[i] = draw(ids_text.filter(lambda t: t not in world.plain_ids["reid"]))
    elif kind == "not-strings":
        datasets["encoded_ids"] = np.arange(N) if draw(st.booleans()) else np.zeros((N, 2), "S3")
    else:  # absent
        del datasets["encoded_ids"]
    return "reid", lambda d: write_h5(d / "sub.h5", world.attrs("reid"), datasets)


PART_SHAPES = {
    "scores": ("reid", (N, N), "float32"),
    "patch_positions": ("reid", (N, P), "int16"),
    "reconstructions": ("invert", (N, SIZE, SIZE), "float32"),
    "encodings": ("transfer", (3, P, D), "float32"),
}


@st.composite
def bad_array(draw, world, part, kind):
    """``part`` with a wrong shape, a wrong dtype, or a bad value (NaN / inf, or out of range)."""
    task, shape, good_dtype = PART_SHAPES[part]
    if kind == "shape":
        bad_shape = tuple(
            draw(st.lists(st.integers(0, 20), min_size=0, max_size=4).filter(lambda s: tuple(s) != shape))
        )
        values = np.zeros(bad_shape, good_dtype)
    elif kind == "dtype":
        wrong = ["S4", "bool", "complex64"] + (["float32", "float64"] if good_dtype == "int16" else [])
        values = np.zeros(shape, draw(st.sampled_from(wrong)))
    else:  # value
        values = np.zeros(shape, good_dtype)
        index = draw(st.integers(0, values.size - 1))
        if good_dtype == "int16":  # integer positions cannot be NaN: out of range instead
            values.flat[index] = draw(st.sampled_from([-1, P, 999]))
        else:
            values.flat[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    datasets = {"encoded_ids": world.ids[task], part: values}
    if part == "patch_positions":
        datasets["mapping"] = world.mapping
    return task, lambda d: write_h5(d / "sub.h5", world.attrs(task), datasets)


@st.composite
def missing_part(draw, world, task):
    datasets = {"encoded_ids": world.ids[task], "patch_positions": np.zeros((N, P), "int16")}
    if task != "reid" and draw(st.booleans()):
        datasets["mapping"] = world.ids[task]  # a part of another task does not stand in
    return task, lambda d: write_h5(d / "sub.h5", world.attrs(task), datasets)


@st.composite
def bad_column_ids(draw, world, part, kind):
    task = "reid" if part == "plain_ids" else "transfer"
    expected = world.plain_ids["reid"] if part == "plain_ids" else world.target_ids["transfer"]
    names = list(expected)
    i = draw(st.integers(0, len(names) - 1))
    if kind == "unknown":
        names[i] = draw(ids_text.filter(lambda t: t not in expected))
    elif kind == "duplicate":
        names[i] = names[(i + 1) % len(names)]
    else:  # short
        names = names[:-1]
    datasets = {"encoded_ids": world.ids[task], part: names}
    if part == "plain_ids":
        datasets["scores"] = np.zeros((N, len(expected)), "float32")
    else:
        datasets["encodings"] = np.zeros((len(expected), D), "float32")
    return task, lambda d: write_h5(d / "sub.h5", world.attrs(task), datasets)


# -- hostile files ----------------------------------------------------------------------------------

USED = {"reid": ("mapping", "scores", "patch_positions"), "invert": ("reconstructions",), "transfer": ("encodings",)}
IGNORED = {
    "reid": ("reconstructions", "encodings"),
    "invert": ("scores", "mapping", "encodings"),
    "transfer": ("scores", "reconstructions", "mapping"),
}
ROW_SHAPES = {
    "mapping": (),
    "scores": (N,),
    "patch_positions": (P,),
    "reconstructions": (SIZE, SIZE),
    "encodings": (P, D),
    "junk": (64,),
}
DECLARED = st.sampled_from([int(3.2e9), 12 << 30, 1 << 40, 1 << 50, 1 << 62])  # 3.2 GB, 12 GiB .. 4 EiB
# What a link may reach in the key, per task: the part it would answer and the truth it holds.
KEY_TRUTH = {
    "reid": ("patch_positions", "truth/patch_perm"),
    "invert": ("reconstructions", "truth/images"),
    "transfer": ("encodings", "truth/target_encodings"),
}


def _legit(world, task):
    """The datasets of an answer that would be scored, as write_h5 takes them."""
    datasets = {"encoded_ids": world.ids[task]}
    if task == "reid":
        datasets["mapping"] = world.mapping
    elif task == "invert":
        datasets["reconstructions"] = np.zeros((N, SIZE, SIZE), "float32")
    else:
        datasets["encodings"] = np.zeros((3, D), "float32")
    return datasets


def _dtype_of(part):
    return "S64" if part == "mapping" else "float64"


@st.composite
def declared_huge(draw, world, where):
    """A small file whose ``part`` declares gigabytes to exabytes, with no data stored."""
    task = draw(st.sampled_from(sorted(USED)))
    part = "junk" if where == "unknown" else draw(st.sampled_from((USED if where == "used" else IGNORED)[task]))
    row, dtype = ROW_SHAPES[part], np.dtype(_dtype_of(part))
    row_bytes = math.prod(row) * dtype.itemsize
    rows = draw(DECLARED) // row_bytes
    contiguous = rows * row_bytes < 1 << 61 and draw(st.booleans())
    chunks = None if contiguous else (max(1, (1 << 20) // row_bytes), *row)

    def writer(d):
        path = write_h5(d / "sub.h5", world.attrs(task), {k: v for k, v in _legit(world, task).items() if k != part})
        with h5py.File(path, "a") as handle:
            handle.create_dataset(part, shape=(rows, *row), dtype=dtype, chunks=chunks)
        return path

    return task, writer


@st.composite
def gzip_bomb(draw, world, kind):
    """Zeros that inflate far beyond the budget: declared so ("declared"), or hidden in one chunk of
    a part of legitimate shape whose gzip stream inflates past its declared size ("chunk")."""
    task, part = draw(st.sampled_from([("invert", "reconstructions"), ("reid", "scores"), ("reid", "reconstructions")]))
    row = ROW_SHAPES[part]
    if kind == "declared":
        inflated = draw(st.sampled_from([int(0.5e9), int(2e9), int(3.2e9)]))
        chunk_rows = (2 << 20) // (math.prod(row) * 8)  # 2 MiB chunks of float64 zeros, ~2 kB each compressed
        shape, chunks = (inflated // (math.prod(row) * 8), *row), (chunk_rows, *row)
    else:  # one chunk for the whole part; its stream is no longer than the chunk, but inflates 100-1000x
        shape = chunks = (N, *row)
    hidden = math.prod(chunks) * 8 * draw(st.sampled_from([100, 1000]))

    def writer(d):
        path = write_h5(d / "sub.h5", world.attrs(task), {k: v for k, v in _legit(world, task).items() if k != part})
        with h5py.File(path, "a") as handle:
            dataset = handle.create_dataset(part, shape=shape, dtype="float64", chunks=chunks, compression="gzip")
            if kind == "declared":
                zeros = zlib.compress(bytes(math.prod(chunks) * 8))
                for start in range(0, shape[0], chunks[0]):
                    dataset.id.write_direct_chunk((start, *[0] * len(row)), zeros)
            else:
                dataset.id.write_direct_chunk((0, *[0] * len(row)), _compressed_zeros(hidden))
        return path

    return task, writer


_BOMBS: dict[int, bytes] = {}


def _compressed_zeros(n_bytes):
    if n_bytes not in _BOMBS:
        squeezer = zlib.compressobj(9)
        blocks = [bytes(min(1 << 20, n_bytes - start)) for start in range(0, n_bytes, 1 << 20)]
        _BOMBS[n_bytes] = b"".join(squeezer.compress(block) for block in blocks) + squeezer.flush()
    return _BOMBS[n_bytes]


@st.composite
def link_into_key(draw, world, kind, relative):
    """A part answered by the key itself: through an external link, a soft link to one, a virtual
    dataset or external storage, naming the key by an absolute or a relative path."""
    task = draw(st.sampled_from(sorted(KEY_TRUTH)))
    part, truth = KEY_TRUTH[task]
    with open_key(world.dirs[task]) as key:
        shape, dtype = key.h5[truth].shape, key.h5[truth].dtype
        offset = key.h5[truth].id.get_offset()  # None for chunked data: point at the file's start

    def writer(d):
        key_path = str(world.key(task).resolve())
        target = os.path.relpath(key_path, d) if relative else key_path
        path = write_h5(d / "sub.h5", world.attrs(task), {"encoded_ids": world.ids[task]})
        with h5py.File(path, "a") as handle:
            if kind == "external-link":
                handle[part] = h5py.ExternalLink(target, "/" + truth)
            elif kind == "soft-link":
                handle["stash"] = h5py.ExternalLink(target, "/" + truth)
                handle[part] = h5py.SoftLink("/stash")
            elif kind == "virtual":
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[...] = h5py.VirtualSource(target, truth, shape=shape)
                handle.create_virtual_dataset(part, layout)
            else:  # external storage: the key file's bytes as the dataset's data
                handle.create_dataset(
                    part, shape=shape, dtype=dtype, external=[(target, offset or 0, math.prod(shape) * dtype.itemsize)]
                )
        return path

    return task, writer


@st.composite
def bad_layout(draw, world, kind):
    """Files that could only be read at a cost no legitimate file has."""
    task = draw(st.sampled_from(sorted(USED)))
    datasets = _legit(world, task)
    attrs = world.attrs(task)
    if kind == "text-attribute":
        attrs["params"] = json.dumps({"x": "a" * draw(st.integers(1 << 20, 4 << 20))})
    elif kind == "string-heap":  # variable-length strings live outside the datasets; HDF5 reads each whole
        attrs["diagnostics"] = "[" + " " * draw(st.integers(17 << 20, 24 << 20)) + "]"
    part = USED[task][0]

    def writer(d):
        # Attributes above 64 kB need the newer object headers.
        path = write_h5(
            d / "sub.h5", attrs, {k: v for k, v in datasets.items() if kind != "filter" or k != part}, libver="latest"
        )
        with h5py.File(path, "a") as handle:
            if kind == "filter":
                options = draw(
                    st.sampled_from(
                        [{"compression": "lzf"}, {"scaleoffset": 2}, {"compression": "gzip", "scaleoffset": 0}]
                    )
                )
                values = datasets[part]
                if part == "mapping":
                    values = np.array([v.encode() for v in values], "S16")
                    options = {"compression": "lzf"}
                handle.create_dataset(part, data=values, chunks=True, **options)
            elif kind == "huge-chunk":
                handle.create_dataset(
                    "patch_positions",
                    shape=(N, P),
                    maxshape=(None, P),
                    dtype="int64",
                    chunks=(draw(st.integers(1 << 19, 1 << 22)), P),
                )
            elif kind == "attribute":
                target = handle if draw(st.booleans()) else handle["encoded_ids"]
                target.attrs["blob"] = np.zeros(draw(st.integers((1 << 17) + 1, 1 << 19)), "float64")
            elif kind == "objects":
                for i in range(draw(st.integers(300, 400))):
                    handle.create_group(f"g{i}")
            elif kind == "vlen-ids":
                del handle["encoded_ids"]
                ids = handle.create_dataset("encoded_ids", (N,), dtype=h5py.vlen_dtype(np.int32))
                for i in range(N):
                    ids[i] = np.arange(i + 1, dtype=np.int32)
        return path

    return task, writer


@st.composite
def csv_bomb(draw, world, kind):
    ids, mapping = world.ids["reid"], world.mapping
    rows = [f"{e},{m}" for e, m in zip(ids, mapping)]
    if kind == "rows":  # more lines than encodings, each well-formed
        rows += [f"enc-{i:05d},img-00000" for i in range(N, N + draw(st.integers(1, 5000)))]
    else:  # size: a file far larger than N lines of ids
        rows[draw(st.integers(0, N - 1))] += " " * draw(st.integers(20_000, 4 << 20))
    text = "encoded_id,plain_id\n" + "\n".join(rows) + "\n"
    return "reid", lambda d: _write_bytes(d / "sub.csv", text.encode())


# Every kind of malformed submission, by name: each is checked with several drawn variants.
CASES = {
    **{f"random-bytes{s}": (lambda s: lambda w: random_bytes(w, s))(s) for s in (".h5", ".csv", ".hdf5")},
    "truncated-hdf5": truncated,
    **{
        f"csv-{k}": (lambda k: lambda w: bad_csv(w, k))(k)
        for k in ("header", "columns", "unknown-plain", "unknown-encoded", "missing", "duplicate")
    },
    **{
        f"attrs-{k}": (lambda k: lambda w: bad_attrs(w, k))(k)
        for k in (
            "format",
            "schema",
            "challenge",
            "oracle",
            "key-knowledge",
            "no-attack",
            "no-challenge",
            "params-json",
            "params-type",
            "knowledge-type",
            "runtime",
        )
    },
    **{
        f"ids-{k}": (lambda k: lambda w: bad_ids(w, k))(k)
        for k in ("unknown", "missing", "duplicate", "mapping-length", "unknown-plain", "not-strings", "absent")
    },
    **{
        f"{p}-{k}": (lambda p, k: lambda w: bad_array(w, p, k))(p, k)
        for p in PART_SHAPES
        for k in ("shape", "dtype", "value")
    },
    **{f"missing-part-{t}": (lambda t: lambda w: missing_part(w, t))(t) for t in ("reid", "invert", "transfer")},
    **{
        f"{p}-{k}": (lambda p, k: lambda w: bad_column_ids(w, p, k))(p, k)
        for p in ("plain_ids", "target_ids")
        for k in ("unknown", "duplicate", "short")
    },
    **{f"declared-huge-{k}": (lambda k: lambda w: declared_huge(w, k))(k) for k in ("used", "ignored", "unknown")},
    **{f"gzip-bomb-{k}": (lambda k: lambda w: gzip_bomb(w, k))(k) for k in ("declared", "chunk")},
    **{
        f"key-{k}-{where}": (lambda k, r: lambda w: link_into_key(w, k, r))(k, where == "relative")
        for k in ("external-link", "soft-link", "virtual", "external-storage")
        for where in ("absolute", "relative")
    },
    **{
        f"layout-{k}": (lambda k: lambda w: bad_layout(w, k))(k)
        for k in ("text-attribute", "string-heap", "filter", "huge-chunk", "attribute", "objects", "vlen-ids")
    },
    **{f"csv-bomb-{k}": (lambda k: lambda w: csv_bomb(w, k))(k) for k in ("rows", "size")},
}


def check_refused(world, kind, task, writer):
    with tempfile.TemporaryDirectory() as folder:
        path = writer(Path(folder))
        CHECKED.add((kind, hashlib.sha256(path.read_bytes()).hexdigest()))
        result = run(["score", str(path), "--key", str(world.key(task)), "--db", str(world.db), "--team", "mallory"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (kind, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (kind, result.stderr)
    assert result.stdout == "", (kind, result.stdout)
    with Store(world.db) as store:
        assert store.counts() == world.counts, kind


SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("kind", sorted(CASES))
@SETTINGS
@given(data=st.data())
def test_malformed_submission_is_refused_cleanly(world, kind, data):
    task, writer = data.draw(CASES[kind](world))
    check_refused(world, kind, task, writer)


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_mixed_malformed_submissions_are_refused_cleanly(world, data):
    kind = data.draw(st.sampled_from(sorted(CASES)))
    task, writer = data.draw(CASES[kind](world))
    check_refused(world, kind, task, writer)


def test_report_how_many_malformed_submissions_were_checked(world, capsys):
    kinds = {kind for kind, _ in CHECKED}
    with capsys.disabled():  # shown even when pytest captures output
        print(f"\nmalformed submissions checked: {len(CHECKED)} distinct files over {len(kinds)} kinds")
    if CHECKED:  # empty only when this test runs alone (e.g. `-k report`)
        assert kinds == set(CASES)
