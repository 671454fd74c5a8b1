import numba
import pytest

from bench import common


@pytest.fixture(scope="session")
def mnist():
    return common.mnist()


@pytest.fixture(scope="session")
def gemm():
    """The machine's float32 GEMM rates in this run, at 1 thread and at all threads,
    each way common.gemm_rates measures it; "1" and "all" are the best of them."""
    rates = {"1": common.gemm_rates(1), "all": common.gemm_rates(None)}
    return {"1": max(rates["1"].values()), "all": max(rates["all"].values()), "ways": rates}


@pytest.fixture(scope="session")
def versions():
    return common.versions()


THREADS = sorted({1, numba.config.NUMBA_NUM_THREADS})
