"""The parallel row reader: the same values as HDF5 reads, and the same refusals of damaged chunks."""

import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from ncbench import h5io
from ncbench.errors import NcbenchError
from ncbench.h5io import (
    FILTERS,
    atomic_path,
    check_output,
    create_streamed,
    fletcher32,
    fletcher32_checksum,
    read_rows,
    write_dataset,
    write_rows,
)


@pytest.fixture
def h5(tmp_path):
    with h5py.File(tmp_path / "rows.h5", "w") as handle:
        yield handle


def _stored(dataset: h5py.Dataset, row: int) -> bytes:
    return dataset.id.read_direct_chunk((row,) + (0,) * (dataset.ndim - 1))[1]


def _by_hdf5(h5: h5py.File, name: str, values: np.ndarray) -> h5py.Dataset:
    """``values`` written through HDF5's own filters, one row per chunk (not :func:`write_rows`)."""
    return h5.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), track_times=False, **FILTERS)


def _with_checksum(body: bytes) -> bytes:
    return body + fletcher32_checksum(body).to_bytes(4, "little")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8, np.int64])
def test_rows_match_hdf5(h5, dtype):
    values = (np.random.default_rng(0).standard_normal((9, 5, 7)) * 50).astype(dtype)
    dataset = write_dataset(h5, "values", values)
    rows = np.array([0, 2, 3, 8])
    for out_dtype in (dtype, np.float32):
        read = read_rows(dataset, rows, dtype=out_dtype)
        assert read.dtype == out_dtype
        np.testing.assert_array_equal(read, values[rows].astype(out_dtype))


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("shape", [(9,), (9, 3), (9, 2048)])
def test_rows_of_one_element_or_few_bytes_match_hdf5(h5, shape, threaded, monkeypatch):
    if threaded:  # small rows are h5py's unless forced
        monkeypatch.setattr(h5io, "_ROW_BYTES_MIN", 0)
    values = np.random.default_rng(1).integers(-(2**31), 2**31, shape).astype(np.int32)
    dataset = write_dataset(h5, "values", values)
    rows = np.arange(1, 9)
    np.testing.assert_array_equal(read_rows(dataset, rows, dtype=None), values[rows])
    np.testing.assert_array_equal(read_rows(dataset, rows, dtype=np.int64), values[rows])


def test_fletcher32_is_hdf5s_for_odd_and_even_lengths(h5):
    """The sums HDF5 stored beside each chunk it wrote are the sums of the chunk's stored bytes."""
    parities = set()
    for length in (1, 2, 3, 100, 999, 1000, 4097):
        values = np.random.default_rng(length).integers(0, 4, (6, length), dtype=np.uint8)
        dataset = _by_hdf5(h5, f"d{length}", values)
        for row in range(6):
            stored = _stored(dataset, row)
            checksum = int.from_bytes(stored[-4:], "little")
            assert fletcher32(stored[:-4]) == ((checksum & 0xFFFF) % 65535, (checksum >> 16) % 65535)
            parities.add(len(stored) % 2)
        np.testing.assert_array_equal(read_rows(dataset, np.arange(6), dtype=np.uint8), values)
    assert parities == {0, 1}


def _hdf5_fletcher32(data: bytes) -> int:
    """H5_checksum_fletcher32 of HDF5's H5checksum.c, line by line (slow: small inputs only)."""
    sum1 = sum2 = 0
    words = len(data) // 2
    position = 0
    while words:
        block = min(words, 360)
        words -= block
        for _ in range(block):
            sum1 = (sum1 + ((data[position] << 8) | data[position + 1])) & 0xFFFFFFFF
            sum2 = (sum2 + sum1) & 0xFFFFFFFF
            position += 2
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[position] << 8
        sum2 += sum1
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def test_fletcher32_checksum_is_the_value_hdf5_stores(h5):
    """Bit for bit, where the sums mod 65535 leave a choice (all-zero data: 0; words of 0xFFFF:
    sums of 65535, not 0), against HDF5's code and against the values HDF5 stored."""
    rng = np.random.default_rng(3)
    crafted = [b"", bytes(6), bytes(7), b"\xff" * 2000, b"\xff" * 2001, b"\x00\x01" * 900, rng.bytes(999)]
    crafted += [rng.integers(254, 256, n, dtype=np.uint8).tobytes() for n in (720, 721, 5000)]
    for data in crafted:
        assert fletcher32_checksum(data) == _hdf5_fletcher32(data), data[:8]
    assert {fletcher32_checksum(b"\xff" * 2000), fletcher32_checksum(bytes(6))} == {0xFFFFFFFF, 0}
    values = rng.standard_normal((4, 64, 130)).astype(np.float32)
    dataset = _by_hdf5(h5, "floats", values)
    for row in range(len(values)):
        stored = _stored(dataset, row)
        assert fletcher32_checksum(stored[:-4]) == int.from_bytes(stored[-4:], "little")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_written_rows_are_the_chunks_hdf5_writes(h5, dtype):
    """write_rows stores, row by row, the bytes HDF5's own filters store; HDF5 reads them back
    (checking their sums) and so does the row reader."""
    values = (np.random.default_rng(4).standard_normal((7, 33, 64)) * 40).astype(dtype)
    by_hdf5 = _by_hdf5(h5, "by_hdf5", values)
    ours = create_streamed(h5, "ours", values.shape, values.dtype)
    write_rows(ours, 0, values[:3])
    write_rows(ours, 3, values[3:])
    for row in range(len(values)):
        assert ours.id.get_chunk_info(row).filter_mask == 0
        assert _stored(ours, row) == _stored(by_hdf5, row)
    np.testing.assert_array_equal(ours[()], values)
    np.testing.assert_array_equal(read_rows(ours, np.arange(7), dtype=None), values)
    through_write_dataset = write_dataset(h5, "write_dataset", values)
    assert [_stored(through_write_dataset, row) for row in range(7)] == [_stored(by_hdf5, row) for row in range(7)]


def test_blocks_of_channels_are_the_chunks_hdf5_writes(h5):
    """A row cut into blocks of its last axis: each block is the chunk HDF5's filters store, and
    HDF5 reads the whole dataset back."""
    values = (np.random.default_rng(5).standard_normal((5, 40, 128)) * 40).astype(np.float32)
    by_hdf5 = h5.create_dataset("by_hdf5", data=values, chunks=(1, 40, 32), track_times=False, **FILTERS)
    ours = create_streamed(h5, "ours", values.shape, values.dtype, columns=32)
    assert ours.chunks == (1, 40, 32)
    write_rows(ours, 0, values[:2])
    write_rows(ours, 2, values[2:])
    for row in range(len(values)):
        for column in range(0, 128, 32):
            offset = (row, 0, column)
            assert ours.id.read_direct_chunk(offset) == by_hdf5.id.read_direct_chunk(offset)
    np.testing.assert_array_equal(ours[()], values)


def test_the_first_blocks_of_rows_written_together_lie_in_one_run_of_the_file(h5):
    """So that reading every row's first block reads the file in runs, not a quarter of each row."""
    values = np.ones((6, 40, 128), np.float32)
    dataset = create_streamed(h5, "values", values.shape, values.dtype, columns=32)
    write_rows(dataset, 0, values)
    offsets = [
        [dataset.id.get_chunk_info_by_coord((row, 0, column)).byte_offset for row in range(6)] for column in (0, 32)
    ]
    assert offsets[0] == sorted(offsets[0]) and max(offsets[0]) < min(offsets[1])


def test_columns_that_do_not_divide_a_row_keep_one_chunk_per_row(h5):
    assert create_streamed(h5, "uneven", (3, 4, 100), np.float32, columns=32).chunks == (1, 4, 100)
    assert create_streamed(h5, "narrow", (3, 4, 32), np.float32, columns=32).chunks == (1, 4, 32)


@pytest.mark.parametrize("columns", [None, 32, 20, 50, 128, 500])
@pytest.mark.parametrize("blocks", [32, None])
def test_the_first_columns_read_are_hdf5s(h5, columns, blocks):
    values = (np.random.default_rng(6).standard_normal((6, 40, 128)) * 40).astype(np.float32)
    dataset = create_streamed(h5, "values", values.shape, values.dtype, columns=blocks)
    write_rows(dataset, 0, values)
    rows = np.array([0, 2, 3, 5])
    for dtype in (None, np.float32):
        read = read_rows(dataset, rows, dtype=dtype, columns=columns)
        np.testing.assert_array_equal(read, values[rows][..., :columns].astype(dtype or values.dtype))
        assert read.flags.c_contiguous


def test_only_the_blocks_holding_the_columns_asked_for_are_read(h5):
    """A damaged block past the columns asked for goes unread; reading the whole row finds it."""
    values = (np.random.default_rng(7).standard_normal((4, 40, 128)) * 40).astype(np.float32)
    dataset = create_streamed(h5, "values", values.shape, values.dtype, columns=32)
    write_rows(dataset, 0, values)
    stored = bytearray(dataset.id.read_direct_chunk((2, 0, 64))[1])
    stored[len(stored) // 2] ^= 0xFF
    dataset.id.write_direct_chunk((2, 0, 64), bytes(stored))
    np.testing.assert_array_equal(read_rows(dataset, np.arange(4), columns=64), values[..., :64])
    with pytest.raises(OSError, match="chunk 2, column 64 fails its fletcher32 checksum"):
        read_rows(dataset, np.arange(4))


def test_written_rows_of_other_layouts_go_through_hdf5(h5):
    values = np.arange(40, dtype=np.int32).reshape(10, 4)  # rows too small for the pool
    for dataset in (
        create_streamed(h5, "small", values.shape, values.dtype),
        h5.create_dataset("plain", (10, 4), np.int32),
    ):
        write_rows(dataset, 2, values[2:9])
        np.testing.assert_array_equal(dataset[2:9], values[2:9])


def test_layouts_without_our_filters_are_read_by_hdf5(h5):
    values = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    for name, options in {"plain": {}, "wide chunks": dict(chunks=(2, 3, 5), **FILTERS)}.items():
        dataset = h5.create_dataset(name, data=values, **options)
        np.testing.assert_array_equal(read_rows(dataset, np.array([1, 3])), values[[1, 3]])


def test_flipped_stored_byte_fails_the_checksum(h5):
    dataset = write_dataset(h5, "values", np.ones((3, 64, 64), np.float16))
    stored = bytearray(_stored(dataset, 1))
    stored[len(stored) // 2] ^= 0xFF
    dataset.id.write_direct_chunk((1, 0, 0), bytes(stored))
    with pytest.raises(OSError, match="fletcher32"):
        read_rows(dataset, np.array([0, 1]))
    with pytest.raises(OSError):  # HDF5 agrees
        dataset[0:2]


def test_chunk_inflating_past_its_row_is_refused(h5):
    dataset = write_dataset(h5, "values", np.zeros((3, 64, 64), np.float16))
    dataset.id.write_direct_chunk((2, 0, 0), _with_checksum(zlib.compress(bytes(64 * 64 * 2 * 1000))))
    with pytest.raises(OSError, match="does not inflate to the 8192 bytes"):
        read_rows(dataset, np.array([1, 2]))


def test_prefetch_reads_a_file_that_fits_and_skips_one_that_does_not(tmp_path, monkeypatch):
    path = tmp_path / "release.h5"
    path.write_bytes(bytes(1 << 20))
    read = []
    real_open = open

    def recording_open(file, *args, **kwargs):
        read.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    monkeypatch.setattr(h5io, "available_memory", lambda: 8 << 20)
    h5io.prefetch(path).join(timeout=10)
    assert path in read
    monkeypatch.setattr(h5io, "available_memory", lambda: 1 << 20)  # the file would take all of it
    assert h5io.prefetch(path) is None
    monkeypatch.setattr(h5io, "available_memory", lambda: None)
    assert h5io.prefetch(path) is None


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    (tmp_path / "plain").write_text("x")
    for out, reason in [
        (tmp_path / ("a" * 300), "(?i)too long"),
        (tmp_path / "plain" / "x.h5", "cannot write"),
        (Path("/proc/ncbench.h5"), "cannot write"),
    ]:
        with pytest.raises(NcbenchError, match=reason):
            check_output(out)
    longest = tmp_path / ("b" * 250)  # its temporary sibling's name stays within the limit too
    with atomic_path(longest) as tmp:
        tmp.write_text("done")
    assert longest.read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["plain", longest.name]
    )
