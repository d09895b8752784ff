"""Property test: every malformed submission is refused by `ncbench score` with one clean line,
exit code 2, no other exception, and the database left exactly as it was."""

import csv
import hashlib
import io
import json
import tempfile
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
            build_release(out, config=TINY, plan=BuildPlan.for_task(task, N), source="phantom", seed=7, device="cpu")
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
        attrs = {"format": "ncbench-submission", "schema_version": 1, "ncbench_version": "0.1.0",
                 "challenge_id": self.challenge[task], "attack": "test-attack", "attack_version": "1.0",
                 "params": "{}", "knowledge": "[]", "runtime_s": 1.0}
        attrs.update(overrides)
        return {k: v for k, v in attrs.items() if v is not None}


def run(args):
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("malformed"))


def write_h5(path: Path, attrs: dict, datasets: dict) -> Path:
    """An HDF5 file written with h5py directly, so that it can break every rule."""
    with h5py.File(path, "w") as handle:
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


PART_SHAPES = {"scores": ("reid", (N, N), "float32"), "patch_positions": ("reid", (N, P), "int16"),
               "reconstructions": ("invert", (N, SIZE, SIZE), "float32"),
               "encodings": ("transfer", (3, P, D), "float32")}


@st.composite
def bad_array(draw, world, part, kind):
    """``part`` with a wrong shape, a wrong dtype, or a bad value (NaN / inf, or out of range)."""
    task, shape, good_dtype = PART_SHAPES[part]
    if kind == "shape":
        bad_shape = tuple(draw(st.lists(st.integers(0, 20), min_size=0, max_size=4).filter(lambda s: tuple(s) != shape)))
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


# Every kind of malformed submission, by name: each is checked with several drawn variants.
CASES = {
    **{f"random-bytes{s}": (lambda s: lambda w: random_bytes(w, s))(s) for s in (".h5", ".csv", ".hdf5")},
    "truncated-hdf5": truncated,
    **{f"csv-{k}": (lambda k: lambda w: bad_csv(w, k))(k)
       for k in ("header", "columns", "unknown-plain", "unknown-encoded", "missing", "duplicate")},
    **{f"attrs-{k}": (lambda k: lambda w: bad_attrs(w, k))(k)
       for k in ("format", "schema", "challenge", "oracle", "key-knowledge", "no-attack", "no-challenge",
                 "params-json", "params-type", "knowledge-type", "runtime")},
    **{f"ids-{k}": (lambda k: lambda w: bad_ids(w, k))(k)
       for k in ("unknown", "missing", "duplicate", "mapping-length", "unknown-plain", "not-strings", "absent")},
    **{f"{p}-{k}": (lambda p, k: lambda w: bad_array(w, p, k))(p, k)
       for p in PART_SHAPES for k in ("shape", "dtype", "value")},
    **{f"missing-part-{t}": (lambda t: lambda w: missing_part(w, t))(t) for t in ("reid", "invert", "transfer")},
    **{f"{p}-{k}": (lambda p, k: lambda w: bad_column_ids(w, p, k))(p, k)
       for p in ("plain_ids", "target_ids") for k in ("unknown", "duplicate", "short")},
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


SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


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
