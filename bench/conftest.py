import numba
import pytest

from bench import common


@pytest.fixture(scope="session")
def mnist():
    return common.mnist()


@pytest.fixture(scope="session")
def gemm():
    """The machine's float32 GEMM rate in this run, at 1 thread and at all threads."""
    return {"1": common.gemm_rate(1), "all": common.gemm_rate(None)}


@pytest.fixture(scope="session")
def versions():
    return common.versions()


THREADS = sorted({1, numba.config.NUMBA_NUM_THREADS})
