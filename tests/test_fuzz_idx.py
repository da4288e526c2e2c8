"""Property-based fuzzing of the IDX reader: only DatasetError may escape, quickly."""

import gzip
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vae_fashion as vf
from conftest import idx_bytes

VALID = [
    idx_bytes(np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)),
    idx_bytes(np.arange(7, dtype=np.uint8)),
]
FUZZ = settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def _parse(data, expected_ndim=None):
    try:
        array = vf.parse_idx(data, "fuzz", expected_ndim)
    except vf.DatasetError as error:
        assert str(error).startswith("fuzz: ")
        return None
    # Whatever parses is exactly what the header says.
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    assert array.shape == dims and array.dtype == np.uint8
    assert array.nbytes == len(data) - 4 - 4 * ndim
    return array


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([None, 1, 3]))
def test_random_bytes(data, expected_ndim):
    _parse(data, expected_ndim)


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(-64, 64),
)
def test_mutated_valid_files(original, edits, resize):
    data = bytearray(original)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: len(data) + resize]) if resize < 0 else bytes(data) + b"\x00" * resize
    _parse(data)


@FUZZ
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), st.binary(max_size=256))
def test_forged_headers_never_allocate_what_they_claim(dims, payload):
    data = struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload
    array = _parse(data)
    assert array is None or array.nbytes == len(payload)


@settings(max_examples=100, deadline=1000)
@given(st.binary(max_size=2048), st.sampled_from(["raw", "gzip", "not really gzip"]))
def test_random_files_on_disk_raw_or_gzip(tmp_path_factory, data, mode):
    path = tmp_path_factory.mktemp("fuzz") / ("f-idx1-ubyte" if mode == "raw" else "f-idx1-ubyte.gz")
    path.write_bytes(gzip.compress(data) if mode == "gzip" else data)
    try:
        vf.read_idx(path)
    except vf.DatasetError as error:
        assert str(error).startswith(str(path))
