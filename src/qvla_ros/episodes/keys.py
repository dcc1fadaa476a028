"""Keys in the terminal for a person at the robot, as lerobot-record has them. No ROS here.

    right arrow   end the episode and keep it
    left arrow    discard the episode and record it again
    Esc           stop recording (the current episode is kept)

    with TerminalKeys(on_key=print) as keys:     # raw keys from stdin when it is a TTY, else nothing happens
        ...                                      # on_key("right" | "left" | "esc") from a reader thread

The terminal is put in cbreak mode without echo (no Enter needed, the keys do not garble the status line) and put
back exactly as it was when the block ends, also after an exception; an `atexit` hook restores it if the process
exits without leaving the block (SIGKILL cannot be caught: `stty sane` then repairs the terminal).
"""

from __future__ import annotations

import atexit
import os
import select
import sys
import threading
import time
from collections.abc import Callable

KEYS = {
    b"\x1b[C": "right",
    b"\x1bOC": "right",
    b"\x1b[D": "left",
    b"\x1bOD": "left",
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
}
ESC_TIMEOUT_S = 0.05  # a lone ESC byte not followed by more within this is the Esc key (not an arrow's prefix)


class KeyParser:
    """Bytes from a terminal -> key names. Escape sequences may arrive split across reads; a lone ESC becomes
    "esc" once `ESC_TIMEOUT_S` passes without more bytes (`flush(now)`). Other bytes: their character ('q', ' ')."""

    def __init__(self):
        self._pending = b""
        self._since = 0.0

    def feed(self, data: bytes, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        buf = self._pending + data
        i = 0
        while i < len(buf):
            if buf[i : i + 1] == b"\x1b":
                seq = buf[i : i + 3]
                if len(seq) < 3:
                    if len(seq) == 2 and seq[1:2] not in (b"[", b"O"):
                        out.append("esc")  # ESC then another key: Esc pressed, then that key
                        i += 1
                        continue
                    break  # maybe the start of a sequence: wait for the rest
                if seq[1:2] in (b"[", b"O"):
                    out.append(KEYS.get(seq, "unknown"))
                    i += 3
                else:
                    out.append("esc")
                    i += 1
            else:
                out.append(buf[i : i + 1].decode("latin-1"))
                i += 1
        rest = buf[i:]
        if rest != self._pending or not rest:
            self._since = now
        self._pending = rest
        return out

    def flush(self, now: float | None = None) -> list[str]:
        """Keys decided by time alone: a lone ESC (or ESC + '[' with nothing after) older than ESC_TIMEOUT_S."""
        now = time.monotonic() if now is None else now
        if self._pending and now - self._since >= ESC_TIMEOUT_S:
            self._pending = b""
            return ["esc"]
        return []


class TerminalKeys:
    """Read keys from a terminal file descriptor in a thread (see the module docstring).

    fd: the terminal (default stdin). When it is not a TTY (a launch file, a pipe, CI), `active` is False and
    nothing is read or changed. on_key is called from the reader thread.
    """

    def __init__(self, on_key: Callable[[str], None], fd: int | None = None):
        self.on_key = on_key
        self.fd = sys.stdin.fileno() if fd is None else fd
        try:
            self.active = os.isatty(self.fd)
        except (OSError, ValueError):
            self.active = False
        self._saved = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.parser = KeyParser()

    def __enter__(self) -> TerminalKeys:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.active or self._thread is not None:
            return
        import termios

        self._saved = termios.tcgetattr(self.fd)
        new = termios.tcgetattr(self.fd)
        new[3] &= ~(termios.ICANON | termios.ECHO)  # cbreak without echo; signals (Ctrl-C) still work
        new[6][termios.VMIN] = 1
        new[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, new)
        atexit.register(self.restore)
        self._thread = threading.Thread(target=self._run, name="qvla-keys", daemon=True)
        self._thread.start()

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent)."""
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            except (termios.error, OSError):
                pass
            self._saved = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        self.restore()
        try:
            atexit.unregister(self.restore)
        except Exception:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], ESC_TIMEOUT_S)
            except (OSError, ValueError):
                return
            keys = []
            if ready:
                try:
                    data = os.read(self.fd, 64)
                except OSError:
                    return
                if not data:
                    return  # end of input
                keys = self.parser.feed(data)
            keys += self.parser.flush()
            for k in keys:
                try:
                    self.on_key(k)
                except Exception as e:  # a callback bug must not kill the key reader
                    print(f"[keys] handling {k!r} failed: {e}", file=sys.stderr)
