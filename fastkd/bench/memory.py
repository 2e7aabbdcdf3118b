"""Peak resident memory of a block of code (Linux), for the benchmarks and the examples."""
import ctypes
import gc
import os
import threading
import time


class PeakRSS:
    """Resident set (kB) of this process before (``base_kb``) and at its peak during (``peak_kb``) a block (Linux)."""

    _libc = None

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _statm_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    def __enter__(self):
        gc.collect()
        try:
            if PeakRSS._libc is None:
                PeakRSS._libc = ctypes.CDLL("libc.so.6")
            # Give freed heap pages back so that reusing them shows up as growth again.
            PeakRSS._libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
        self.base_kb = self._statm_kb()
        self._max_kb, self._stop = self.base_kb, False
        if self._sampler is not None:
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop:
            self._max_kb = max(self._max_kb, self._statm_kb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._sampler is not None:
            self._stop = True
            self._sampler.join()
            self.peak_kb = max(self._max_kb, self._statm_kb())
        else:
            self.peak_kb = self._status_kb("VmHWM")
        return False
