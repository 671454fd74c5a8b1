"""Ctrl-C that stops training between batches instead of in the middle of one.

The compiled epoch runs without the GIL and checks a one-element flag before each
batch. Python's own SIGINT handler would only run once the compiled call returns,
so the C-level handler's wakeup byte (signal.set_wakeup_fd) is read by a small
watcher thread, which sets the flag at once.
"""
import os
import select
import signal
import threading

import numpy as np


class StopOnInterrupt:
    """Context manager: `flag[0]` becomes 1 on SIGINT; `interrupted` tells afterwards.

    Only active in the main thread (where signals are delivered); elsewhere it is
    inert and Ctrl-C behaves as usual.
    """

    def __init__(self):
        self.flag = np.zeros(1, dtype=np.int64)
        self._active = False

    @property
    def interrupted(self):
        return bool(self.flag[0])

    def _handler(self, signum, frame):
        self.flag[0] = 1

    def _watch(self):
        while True:
            ready, _, _ = select.select([self._r], [], [], 0.5)
            if self._done.is_set():
                return
            if ready:
                try:
                    data = os.read(self._r, 64)
                except OSError:
                    return
                if signal.SIGINT in data:
                    self.flag[0] = 1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        try:
            self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except ValueError:          # not the main interpreter's main thread
            os.close(self._r)
            os.close(self._w)
            return self
        self._old_handler = signal.signal(signal.SIGINT, self._handler)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastmlp-interrupt", daemon=True)
        self._thread.start()
        self._active = True
        return self

    def __exit__(self, *exc):
        if not self._active:
            return False
        signal.signal(signal.SIGINT, self._old_handler)
        signal.set_wakeup_fd(self._old_fd)
        self._done.set()
        try:
            os.write(self._w, b"\0")   # wake the watcher now, not at its next timeout
        except OSError:
            pass
        self._thread.join()
        os.close(self._r)
        os.close(self._w)
        self._active = False
        return False
