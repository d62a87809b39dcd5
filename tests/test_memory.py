"""Never leak: resident memory and the thread count stay flat over many
calls and many model lifetimes.

Resident set size comes from /proc/self/statm (Linux); elsewhere the tests
are skipped.  Each test warms up first (allocator arenas, the worker pool,
NumPy's caches), then bounds the growth over the measured loop.  The bounds
are far below what any per-call or per-model leak would add up to: 100,000
calls leaking 100 bytes each, or 1,000 models leaking their packed weights
(~0.6 MB each here), would exceed them.
"""
import gc
import os

import numpy as np
import pytest

import fastlstm

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="needs /proc/self/statm (Linux)")

MB = 1 << 20


def _rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _threads():
    return len(os.listdir("/proc/self/task"))


def test_rss_flat_over_100k_small_calls():
    rng = np.random.default_rng(0)
    m = fastlstm.LSTM(4, 8, num_layers=2, bidirectional=True, seed=0)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    x64 = x.astype(np.float64)
    xu = x[:, 0]
    hx = (np.zeros((4, 2, 8), np.float32), np.ones((4, 2, 8), np.float32))
    lengths = np.array([1, 3])
    bad = np.zeros((3, 2, 5), np.float32)

    def one(i):
        k = i % 8
        if k == 0:
            return m(x, num_threads=1)
        if k == 1:
            return m(x64, hx, num_threads=1)
        if k == 2:
            return m(xu, num_threads=1)
        if k == 3:
            return m(x, lengths=lengths, num_threads=1)
        if k == 4:
            return m(x, hx, lengths=[3, 0], padding="repeat", num_threads=1)
        if k == 5:
            return m(x, num_threads=2)  # the worker pool
        if k == 6:
            return m(x[:0], num_threads=1)
        try:  # refused calls must not leak either
            m(bad)
        except fastlstm.ShapeError:
            pass

    for i in range(5000):
        one(i)
    before, threads_before = _rss(), _threads()
    for i in range(100_000):
        one(i)
    grown = _rss() - before
    assert grown < 10 * MB, f"RSS grew by {grown / MB:.1f} MB over 100,000 calls"
    assert _threads() <= threads_before, "threads were left behind"


def test_rss_flat_over_1000_models():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 32)).astype(np.float32)
    new_w = rng.standard_normal((256, 64)).astype(np.float32)

    def lifetime(i):
        m = fastlstm.LSTM(32, 64, num_layers=2, bidirectional=True, seed=i,
                          dtype=np.float64 if i % 4 == 3 else np.float32)
        m(x)
        m.set_weights(1, 1, w_hh=new_w)  # repacks a cell
        m(x, num_threads=1)
        return m.packed_nbytes

    packed = lifetime(0)
    assert packed > 500_000  # a leak of the packed weights would be visible
    for i in range(50):
        lifetime(i)
    before = _rss()
    for i in range(1000):
        lifetime(i)
    grown = _rss() - before
    assert grown < 20 * MB, f"RSS grew by {grown / MB:.1f} MB over 1,000 models ({packed} packed bytes each)"


def test_rss_flat_over_large_calls():
    """Calls with multi-megabyte workspaces and outputs (freed every call)."""
    m = fastlstm.LSTM(64, 256, num_layers=2, seed=2)
    x = np.random.default_rng(2).standard_normal((100, 16, 64)).astype(np.float32)
    for _ in range(3):
        m(x)
    before = _rss()
    for _ in range(20):
        m(x)
    grown = _rss() - before
    assert grown < 20 * MB, f"RSS grew by {grown / MB:.1f} MB over 20 large calls"
