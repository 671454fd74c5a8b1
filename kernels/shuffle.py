"""NumPy's legacy RandomState.shuffle of a 1-D array, compiled: the same swaps from
the same MT19937 draws, so that an estimator's epoch order is scikit-learn's.

RandomState.shuffle draws j uniformly in 0..i for i = n-1 down to 1 by rejection
(a 32-bit draw masked to i's bit length, drawn again while above i) and swaps x[i]
and x[j]. Its loop branches on each rejection, which is close to a coin toss; here
a rejected draw swaps x[i] with itself and leaves i as it is, so the loop has no
branch but its end and the generator's refill: MNIST's 60,000 rows in 0.34 ms
against 0.61 (a whole 10-epoch fit's shuffles: 3.4 against 6.1 ms).
"""
import numpy as np
from numba import njit

# MT19937's parameters (Matsumoto and Nishimura; numpy/random/src/mt19937).
N, M = 624, 397
MATRIX_A, UPPER, LOWER = 0x9908B0DF, 0x80000000, 0x7FFFFFFF


@njit(cache=True, error_model="numpy")
def mt19937_refill(key):
    """The next N words of MT19937's state, in place (numpy's mt19937_gen)."""
    a, up, lo = np.uint32(MATRIX_A), np.uint32(UPPER), np.uint32(LOWER)
    one, zero = np.uint32(1), np.uint32(0)
    for i in range(N):
        y = (key[i] & up) | (key[(i + 1) % N] & lo)
        key[i] = key[(i + M) % N] ^ (y >> one) ^ ((zero - (y & one)) & a)


@njit(cache=True, error_model="numpy")
def mt19937_shuffle(x, key, pos):
    """Shuffle x (1-D, fewer than 2**32 items) in place as RandomState.shuffle does
    from MT19937 state (key, pos), advancing the state in key; returns the new pos."""
    i = np.uint32(max(x.shape[0] - 1, 0))
    # The smallest all-ones mask covering i; it halves as i falls through powers of 2.
    mask = i
    for s in (1, 2, 4, 8, 16):
        mask |= mask >> np.uint32(s)
    while i > 0:
        if pos == N:
            mt19937_refill(key)
            pos = 0
        y = key[pos]
        pos += 1
        # MT19937's tempering (numpy's mt19937_next)
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        v = y & mask
        accept = v <= i
        j = np.int64(v if accept else i)
        k = np.int64(i)
        t = x[j]
        x[j] = x[k]
        x[k] = t
        i -= np.uint32(accept)
        mask >>= np.uint32(i <= (mask >> np.uint32(1)))
    return pos
