"""Wall-clock medians of a callable (for ``fastkd.verify`` and the benchmark scripts)."""
import statistics
import time


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """The median of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
