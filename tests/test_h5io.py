"""The parallel row reader: the same values as HDF5 reads, and the same refusals of damaged chunks."""

import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from ncbench import h5io
from ncbench.h5io import FILTERS, create_streamed, fletcher32, fletcher32_checksum, read_rows, write_dataset, write_rows


@pytest.fixture
def h5(tmp_path):
    with h5py.File(tmp_path / "rows.h5", "w") as handle:
        yield handle


def _stored(dataset: h5py.Dataset, row: int) -> bytes:
    return dataset.id.read_direct_chunk((row,) + (0,) * (dataset.ndim - 1))[1]


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
        dataset = write_dataset(h5, f"d{length}", values)
        for row in range(6):
            stored = _stored(dataset, row)
            checksum = int.from_bytes(stored[-4:], "little")
            assert fletcher32(stored[:-4]) == ((checksum & 0xFFFF) % 65535, (checksum >> 16) % 65535)
            parities.add(len(stored) % 2)
        np.testing.assert_array_equal(read_rows(dataset, np.arange(6), dtype=np.uint8), values)
    assert parities == {0, 1}


def test_fletcher32_checksum_is_the_value_hdf5_stores(h5):
    """Bit for bit, where the sums mod 65535 leave a choice: all-zero words (0, not 65535), words
    of 0xFFFF (sums of 65535, not 0) and data of odd length."""
    rng = np.random.default_rng(3)
    cases = {
        "zeros": np.zeros((2, 5000), np.uint8),
        "ones": np.full((2, 5001), 0xFF, np.uint8),
        "few values": rng.integers(254, 256, (4, 4097), dtype=np.uint8),
        "random odd": rng.integers(0, 256, (4, 999), dtype=np.uint8),
        "floats": rng.standard_normal((4, 64, 130)).astype(np.float32),
    }
    for name, values in cases.items():
        h5.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), **FILTERS)
        for row in range(len(values)):
            stored = _stored(h5[name], row)
            assert fletcher32_checksum(stored[:-4]) == int.from_bytes(stored[-4:], "little"), name
    assert fletcher32_checksum(b"") == 0 and fletcher32_checksum(bytes(6)) == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8])
def test_written_rows_are_the_chunks_hdf5_writes(h5, dtype):
    """write_rows stores, row by row, the bytes HDF5's own filters store; HDF5 reads them back
    (checking their sums) and so does the row reader."""
    values = (np.random.default_rng(4).standard_normal((7, 33, 64)) * 40).astype(dtype)
    by_hdf5 = write_dataset(h5, "by_hdf5", values)
    ours = create_streamed(h5, "ours", values.shape, values.dtype)
    write_rows(ours, 0, values[:3])
    write_rows(ours, 3, values[3:])
    for row in range(len(values)):
        assert ours.id.get_chunk_info(row).filter_mask == 0
        assert _stored(ours, row) == _stored(by_hdf5, row)
    np.testing.assert_array_equal(ours[()], values)
    np.testing.assert_array_equal(read_rows(ours, np.arange(7), dtype=None), values)


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
    monkeypatch.setattr(h5io, "_available_memory", lambda: 8 << 20)
    h5io.prefetch(path).join(timeout=10)
    assert path in read
    monkeypatch.setattr(h5io, "_available_memory", lambda: 1 << 20)  # the file would take all of it
    assert h5io.prefetch(path) is None
    monkeypatch.setattr(h5io, "_available_memory", lambda: None)
    assert h5io.prefetch(path) is None
