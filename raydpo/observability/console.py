"""Console progress on the driver: what each stage is doing, readable on a terminal and in a log.

On a terminal a stage's progress is one line rewritten in place. Anywhere else (a file, a pipe,
``ray job logs``) every update is a whole line, at most one per stage every
``logging.progress_every_s`` seconds, so a job log stays short and free of control characters.
Only the driver prints progress; trainer progress comes from rank 0's metrics.jsonl
(:mod:`raydpo.observability.watch`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from typing import TextIO

LEVELS = {"quiet": 0, "normal": 1, "verbose": 2}
PREFIX = "[raydpo] "
#: On a terminal: erase what is left of the line after a shorter rewrite.
_CLEAR_TO_END = "\x1b[K"
#: On a terminal: the fastest a status line is rewritten (a cheap stage may update thousands of times).
_TTY_EVERY_S = 0.2
#: One lock for every console line and every worker line Ray forwards (see guard_ray_log_forwarding).
_LOCK = threading.RLock()


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or a stand-in without isatty
        return False


class Console:
    """Progress writer with a level (``quiet`` / ``normal`` / ``verbose``).

    ``say`` writes a permanent line; ``update`` a stage's progress (see the module docstring).
    Thread-safe: the trainer watcher prints from its own thread.
    """

    def __init__(self, level: str = "normal", every_s: float = 10.0, stream: TextIO | None = None):
        self.level = LEVELS[level]
        self.every_s = every_s
        self._stream = stream
        self._last: dict[str, float] = {}
        self._live = False
        self._lock = _LOCK

    @property
    def stream(self) -> TextIO:
        # Looked up at write time: pytest and Ray swap sys.stdout after this object is made.
        return self._stream or sys.stdout

    def enabled(self, level: str = "normal") -> bool:
        return self.level >= LEVELS[level]

    def say(self, message: str, level: str = "normal") -> None:
        """A permanent line (ends any status line showing)."""
        if not self.enabled(level):
            return
        with self._lock:
            self._write(PREFIX + message + "\n", end_live=True)

    def update(self, key: str, message: str, final: bool = False) -> None:
        """Progress of stage ``key``; ``final`` marks its last update (always printed)."""
        if not self.enabled("normal"):
            return
        now = time.monotonic()
        # Verbose keeps every update, so even a terminal gets whole lines.
        tty = is_terminal(self.stream) and not self.enabled("verbose")
        with self._lock:
            if tty:
                if not final and now - self._last.get(key, -math.inf) < _TTY_EVERY_S:
                    return
                self._last[key] = now
                if not final:  # \r only rewinds one screen row: a status line must fit on it
                    message = message[:max(20, shutil.get_terminal_size().columns - len(PREFIX) - 1)]
                self._write("\r" + PREFIX + message + _CLEAR_TO_END + ("\n" if final else ""))
                self._live = not final
                return
            if final or self.enabled("verbose") or now - self._last.get(key, -math.inf) >= self.every_s:
                self._last[key] = now
                self._write(PREFIX + message + "\n")

    def _write(self, text: str, end_live: bool = False) -> None:
        if end_live and self._live:
            text = "\n" + text
            self._live = False
        self.stream.write(text)
        self.stream.flush()

    def end_live_line(self) -> None:
        """Before someone else's line: finish a status line showing on the terminal."""
        if self._live:
            self._write("", end_live=True)


_current = Console()


def guard_ray_log_forwarding() -> None:
    """Make the lines Ray forwards from workers take the console's lock.

    Ray's driver thread prints each forwarded line as two writes (the text, then the newline), to
    stdout or stderr; a console line written in between lands mid-line, and in a job log (stdout
    and stderr in one file) it glues onto a worker's line. Under one lock neither splits the other,
    and a terminal status line is ended first. Ray internals: if the name moves, nothing is wrapped.
    """
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None or getattr(original, "raydpo_guarded", False):
        return

    def print_worker_logs(*args, **kwargs):
        with _LOCK:
            _current.end_live_line()
            return original(*args, **kwargs)

    print_worker_logs.raydpo_guarded = True
    ray_worker.print_worker_logs = print_worker_logs


def configure(level: str = "normal", every_s: float = 10.0, stream: TextIO | None = None) -> Console:
    """Set the process's console (``logging.console``, ``logging.progress_every_s``)."""
    global _current
    if not is_terminal(stream or sys.stdout):
        # Ray wraps the prefix of every forwarded worker line in colour codes unless told not to.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    guard_ray_log_forwarding()
    _current = Console(level, every_s, stream)
    return _current


def get() -> Console:
    return _current


def duration(seconds: float) -> str:
    """12.3 -> '12s', 185 -> '3m05s', 7384 -> '2h03m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done: float, total: float, elapsed: float) -> str:
    """'ETA 3m05s' at the average rate so far, or 'ETA ?' before there is one."""
    if done <= 0 or elapsed <= 0:
        return "ETA ?"
    return f"ETA {duration((total - done) * elapsed / done)}"


class Rate:
    """Throughput since the first update, so start-up (actors starting, a model loading) does not
    skew it: ``suffix(done)`` -> ', 1,234.5 rows/s' (', ETA 12s' too when the total is known)."""

    def __init__(self, unit: str, total: int | None = None):
        self.unit, self.total = unit, total
        self.first: tuple[int, float] | None = None

    def suffix(self, done: int, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = (done, now)
        n, elapsed = done - self.first[0], now - self.first[1]
        if n <= 0 or elapsed <= 0:
            return ""
        text = f", {n / elapsed:,.1f} {self.unit}/s"
        return text + (f", {eta(n, self.total - self.first[0], elapsed)}" if self.total is not None else "")


def counts(by_name: dict[str, int]) -> str:
    """{'missing_field': 3, 'wrong_type': 1} -> 'missing_field 3, wrong_type 1' (largest first)."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0])))
