"""The inference worker: runs the policy off the control loop and hands chunks back, never blocking the 30 Hz timer.

Two backends behind one interface (`policy.worker`):
  process  the policy lives in a child process (`python -m qvla_ros.control.worker`) with its own interpreter and
           GIL, at a lower CPU priority. Observations and chunks cross a pipe as a JSON header plus raw array
           bytes (dtype/shape in the header): no pickle, nothing executable is ever deserialized.
  thread   the policy lives in this process; a thread calls `predict`. torch releases the GIL inside large
           kernels, but a small model spends much of its time in Python, which then competes with the timer.
bench/bench_runtime.py measures both on this machine; the default is the one that kept the stream steadier.

A driver thread (both backends) loops: ask the node for the newest observation -> predict -> `on_chunk`. Reload
loads the new policy beside the old one (a second child process, or a second runtime in a loader thread), checks
it, then swaps it in between two predictions; the 30 Hz stream keeps playing the chunks already scheduled.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qvla_ros.policy.types import Observation, PredictedChunk

_HEADER = struct.Struct("<I")  # little-endian uint32: length of the JSON header that follows
_MAX_HEADER = 1 << 20
_DTYPES = {"uint8", "float32", "float64", "int64"}


class WorkerError(RuntimeError):
    """Inference could not run (load failed, the child process died, a predict failed or timed out)."""


@dataclass
class PolicyInfo:
    """What the node needs to know about a loaded policy."""

    camera_names: list[str]
    joint_names: list[str]
    horizon: int
    step_period: float
    model_id: str
    path: str
    quantization: dict = field(default_factory=dict)
    load_seconds: float = 0.0


# ---------------------------------------------------------------- framing (both ends of the pipe)
def write_frame(f, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    """One message: uint32 header length, JSON header (with an `arrays` table), then the arrays' raw bytes."""
    arrays = arrays or {}
    table, blobs = [], []
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise WorkerError(f"array {key!r} has dtype {a.dtype}; allowed: {sorted(_DTYPES)}")
        table.append({"key": key, "dtype": a.dtype.name, "shape": list(a.shape), "nbytes": int(a.nbytes)})
        blobs.append(memoryview(a).cast("B"))
    raw = json.dumps({**header, "arrays": table}).encode()
    f.write(_HEADER.pack(len(raw)) + raw)
    for b in blobs:
        f.write(b)
    f.flush()


def read_frame(f) -> tuple[dict, dict[str, np.ndarray]]:
    """The inverse of write_frame; EOFError when the other end closed the pipe."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("pipe closed")
    (n,) = _HEADER.unpack(head)
    if n > _MAX_HEADER:
        raise WorkerError(f"frame header of {n} bytes is larger than {_MAX_HEADER}: the stream is corrupt")
    header = json.loads(f.read(n))
    arrays = {}
    for entry in header.pop("arrays", []):
        if entry["dtype"] not in _DTYPES:
            raise WorkerError(f"array dtype {entry['dtype']!r} not allowed")
        # read straight into a fresh (writable) array: no extra copy, and torch.from_numpy is happy with it
        a = np.empty(entry["shape"], dtype=entry["dtype"])
        if a.nbytes != entry["nbytes"]:
            raise WorkerError(f"array {entry['key']!r}: {entry['nbytes']} bytes do not fit shape {entry['shape']}")
        view = memoryview(a).cast("B") if a.nbytes else b""
        got = f.readinto(view) if a.nbytes else 0
        if got < a.nbytes:
            raise EOFError("pipe closed mid-frame")
        arrays[entry["key"]] = a
    return header, arrays


def _obs_to_frame(obs: Observation) -> tuple[dict, dict[str, np.ndarray]]:
    arrays = {f"image/{k}": np.asarray(v, dtype=np.uint8) for k, v in obs.images.items()}
    arrays["state"] = np.asarray(obs.state, dtype=np.float64)
    return {"op": "predict", "instruction": obs.instruction, "stamp": obs.stamp}, arrays


def _obs_from_frame(header: dict, arrays: dict[str, np.ndarray]) -> Observation:
    images = {k[len("image/") :]: v for k, v in arrays.items() if k.startswith("image/")}
    return Observation(
        images=images, state=arrays["state"], instruction=header["instruction"], stamp=float(header["stamp"])
    )


def _info_of(runtime, path: str, load_seconds: float) -> PolicyInfo:
    return PolicyInfo(
        camera_names=list(runtime.camera_names),
        joint_names=list(runtime.joint_names),
        horizon=int(runtime.horizon),
        step_period=float(runtime.step_period),
        model_id=str(runtime.model_id),
        path=str(path),
        quantization=dict(runtime.quantization_status()),
        load_seconds=load_seconds,
    )


def _load_runtime(path: str, device: str, warmup: bool, torch_threads: int):
    import torch

    from qvla_ros.policy.runtime import PolicyRuntime

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    return PolicyRuntime.load(path, device=device, warmup=warmup)


# ---------------------------------------------------------------- backends
class ThreadBackend:
    """The policy runtime in this process."""

    kind = "thread"

    def __init__(self, runtime, info: PolicyInfo):
        self.runtime = runtime
        self.info = info

    @classmethod
    def load(cls, path: str, device: str = "cpu", warmup: bool = True, torch_threads: int = 0, **_) -> ThreadBackend:
        # (nice is ignored: see InferenceWorker._run)
        t = time.perf_counter()
        runtime = _load_runtime(path, device, warmup, torch_threads)
        return cls(runtime, _info_of(runtime, path, time.perf_counter() - t))

    def predict(self, obs: Observation) -> PredictedChunk:
        return self.runtime.predict(obs)

    @property
    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self.runtime = None


class ProcessBackend:
    """The policy runtime in a child process, spoken to over its stdin/stdout with write_frame/read_frame."""

    kind = "process"

    def __init__(self, proc: subprocess.Popen, info: PolicyInfo, predict_timeout: float):
        self.proc = proc
        self.info = info
        self.predict_timeout = predict_timeout
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str,
        device: str = "cpu",
        warmup: bool = True,
        torch_threads: int = 0,
        nice: int = 0,
        load_timeout: float = 300.0,
        predict_timeout: float = 30.0,
        env: dict | None = None,
    ) -> ProcessBackend:
        t = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "qvla_ros.control.worker",
            "--nice",
            str(nice),
            "--torch-threads",
            str(torch_threads),
        ]
        child_env = dict(os.environ if env is None else env)
        # the child finds qvla_ros the way this process did (a source checkout is not always installed)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, child_env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env, bufsize=-1)
        if nice > 0 and hasattr(os, "setpriority"):
            # at once, not only when the child gets to it: its imports (torch) must not compete with the 30 Hz loop
            try:
                os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            except OSError:
                pass
        try:
            write_frame(proc.stdin, {"op": "load", "path": str(path), "device": device, "warmup": bool(warmup)})
            header, _ = _read_with_timeout(proc, load_timeout, "loading the policy")
        except BaseException:
            _stop(proc)
            raise
        if not header.get("ok"):
            _stop(proc)
            raise WorkerError(header.get("error", "the inference process refused to load the policy"))
        info = PolicyInfo(**{**header["info"], "load_seconds": time.perf_counter() - t})
        return cls(proc, info, predict_timeout)

    def predict(self, obs: Observation) -> PredictedChunk:
        with self._lock:
            if not self.alive:
                raise WorkerError(f"the inference process exited (rc={self.proc.returncode})")
            header, arrays = _obs_to_frame(obs)
            try:
                write_frame(self.proc.stdin, header, arrays)
                reply, out = _read_with_timeout(self.proc, self.predict_timeout, "predicting")
            except (BrokenPipeError, EOFError, OSError) as e:
                raise WorkerError(f"the inference process died ({e}; rc={self.proc.poll()})") from e
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "predict failed"))
        return PredictedChunk(
            actions=out["actions"],
            step_period=float(reply["step_period"]),
            stamp=float(reply["stamp"]),
            latency=float(reply["latency"]),
            model_id=str(reply["model_id"]),
            timing=dict(reply.get("timing", {})),
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        with self._lock:
            if self.alive:
                try:
                    write_frame(self.proc.stdin, {"op": "quit"})
                except OSError:
                    pass
            _stop(self.proc)


def _read_with_timeout(proc: subprocess.Popen, timeout: float, what: str):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        _stop(proc)
        raise WorkerError(f"the inference process took longer than {timeout:.0f} s {what}; it was stopped")
    try:
        return read_frame(proc.stdout)
    except EOFError:
        proc.wait(timeout=5)
        raise WorkerError(
            f"the inference process exited while {what} (rc={proc.returncode}); its error is in the node's log"
        ) from None


def _stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    for f in (proc.stdin, proc.stdout):
        try:
            if f:
                f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BACKENDS = {"thread": ThreadBackend, "process": ProcessBackend}


def _close_later(backend) -> None:
    threading.Thread(target=backend.close, name="qvla-close-backend", daemon=True).start()


# ---------------------------------------------------------------- the driver
class InferenceWorker:
    """Runs `get_observation -> predict -> on_chunk` in a thread until stopped.

    get_observation(): the newest observation not yet used, with a tag the node wants back (e.g. its hold epoch),
        as (Observation, tag); None when there is none.
    on_chunk(chunk, tag): a new chunk. on_error(message, tag): a predict failed (the node holds).
    on_loaded(info): a policy was loaded (at start or by reload). check(info): '' or why the node refuses it.
    """

    def __init__(
        self,
        mode: str,
        path: str,
        *,
        get_observation: Callable[[], tuple[Observation, object] | None],
        on_chunk: Callable[[PredictedChunk, object], None],
        on_error: Callable[[str, object], None],
        on_loaded: Callable[[PolicyInfo], None] = lambda info: None,
        check: Callable[[PolicyInfo], str] = lambda info: "",
        device: str = "cpu",
        warmup: bool = True,
        nice: int = 0,
        torch_threads: int = 0,
        min_interval: float = 0.0,
        poll_interval: float = 0.004,
        backend_factory: Callable[..., object] | None = None,
    ):
        if mode not in BACKENDS and backend_factory is None:
            raise ValueError(f"worker mode {mode!r} is not one of {', '.join(BACKENDS)}")
        self.mode = mode
        self.path = path
        self._factory = backend_factory or BACKENDS[mode].load
        self._opts = {"device": device, "warmup": warmup, "torch_threads": torch_threads, "nice": nice}
        self._get_observation = get_observation
        self._on_chunk = on_chunk
        self._on_error = on_error
        self._on_loaded = on_loaded
        self._check = check
        self.min_interval = float(min_interval)
        self._poll = poll_interval
        self._backend = None
        self._in_use = None
        self._retired: list = []
        self._installs = 0  # policies installed so far (first load, restarts, reloads)
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = "not started"
        self.load_error = ""
        self.predictions = 0
        self.failures = 0
        self.restarts = 0

    # -- lifetime
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qvla-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            backends = [b for b in (self._backend, *self._retired) if b is not None]
            self._backend, self._retired = None, []
        for b in backends:
            b.close()

    @property
    def info(self) -> PolicyInfo | None:
        b = self._backend
        return b.info if b is not None else None

    @property
    def child_pids(self) -> list[int]:
        with self._lock:
            return [b.pid for b in (self._backend, *self._retired) if b is not None and hasattr(b, "pid")]

    # -- loading
    def _load(self, path: str):
        backend = self._factory(path, **self._opts)
        why = self._check(backend.info)
        if why:
            backend.close()
            raise WorkerError(why)
        return backend

    def reload(self, path: str) -> tuple[bool, str]:
        """Load `path` beside the running policy and swap it in; on any problem the old one keeps running."""
        if not self._reload_lock.acquire(blocking=False):
            return False, "another reload is in progress; try again when it has finished"
        try:
            try:
                new = self._load(path)
            except Exception as e:
                return False, f"refused {path}: {e} (the running policy {self._model_id()} keeps running)"
            self._install(new, path)
            return True, (
                f"loaded {new.info.model_id} from {path} in {new.info.load_seconds:.1f} s ({self.mode} worker)"
            )
        finally:
            self._reload_lock.release()

    def _install(self, new, path: str, if_installs: int | None = None) -> bool:
        """Make `new` the running policy, exactly the same way for a first load, a restart and a reload (status,
        error and path all describe the new policy). With if_installs: only if nothing was installed since that
        count (a restart racing a reload must not replace the reloaded policy); False when it was not installed."""
        with self._lock:
            if if_installs is not None and self._installs != if_installs:
                return False
            old = self._backend
            self._backend = new
            self.path = path
            self._installs += 1
            self.status = "running"
            self.load_error = ""
            if old is not None and old is self._in_use:
                self._retired.append(old)  # the driver closes it after its current predict
                old = None
        if old is not None:
            _close_later(old)
        self._on_loaded(new.info)
        return True

    def _model_id(self) -> str:
        info = self.info
        return info.model_id if info else "(none)"

    # -- the loop
    def _run(self) -> None:
        # `nice` applies to the child process only (process mode). In thread mode nothing is niced: the inference
        # thread holds the GIL, and a thread waiting for it (the control timer) would wait for a low-priority
        # holder (priority inversion: measured as multi-second stalls on a loaded machine).
        backoff = 0.5
        last_start = -1e9
        while not self._stop.is_set():
            with self._lock:
                backend = self._backend
            if backend is None or not backend.alive:
                backend = self._ensure_backend(backend)
                if backend is None:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = 0.5
            wait = last_start + self.min_interval - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, 0.05))
                continue
            got = self._get_observation()
            if got is None:
                self._stop.wait(self._poll)
                continue
            obs, tag = got
            with self._lock:
                backend = self._backend
                self._in_use = backend
            last_start = time.monotonic()
            try:
                chunk = backend.predict(obs)
            except Exception as e:
                self.failures += 1
                self._on_error(f"inference failed: {e}", tag)
            else:
                self.predictions += 1
                try:
                    self._on_chunk(chunk, tag)
                except Exception as e:  # the node's handler failed: say so, keep the loop alive
                    self._on_error(f"handling a chunk failed: {type(e).__name__}: {e}", tag)
            finally:
                with self._lock:
                    self._in_use = None
                    retired, self._retired = self._retired, []
                for b in retired:
                    _close_later(b)  # a process takes a moment to exit: never stall inference for it

    def _ensure_backend(self, dead):
        """Load the policy (first start), or restart it after the child process died."""
        if dead is not None:
            self.restarts += 1
            self._on_error(f"the inference {self.mode} stopped; restarting it", None)
            dead.close()
        with self._lock:
            installs, path = self._installs, self.path
            if self.status != "load failed":  # keep saying why the last try failed while retrying
                self.status = "loading"
        try:
            backend = self._load(path)
        except Exception as e:
            with self._lock:
                if self._installs != installs:
                    return self._backend  # a reload installed a policy meanwhile: this failure is moot
                self.status = "load failed"
                self.load_error = str(e)
            self._on_error(f"could not load the policy {path}: {e}", None)
            return None
        if not self._install(backend, path, if_installs=installs):
            backend.close()  # a reload won the race: keep its policy
            return self._backend
        return backend


# ---------------------------------------------------------------- the child process
def _serve(nice: int, torch_threads: int) -> int:
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent node decides when this process ends
    # (it closes the pipe, or sends quit), so a SIGINT here must not kill an inference half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns the original stdout; anything printed (by us or a library) goes to stderr instead.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb")
    if nice > 0 and os.getpriority(os.PRIO_PROCESS, 0) < nice:  # the parent may have lowered it already
        os.nice(nice - os.getpriority(os.PRIO_PROCESS, 0))
    runtime = None
    while True:
        try:
            header, arrays = read_frame(proto_in)
        except EOFError:
            return 0
        op = header.get("op")
        if op == "quit":
            return 0
        if op == "load":
            t = time.perf_counter()
            try:
                runtime = _load_runtime(
                    header["path"], header.get("device", "cpu"), header.get("warmup", True), torch_threads
                )
                info = _info_of(runtime, header["path"], time.perf_counter() - t).__dict__
                write_frame(proto_out, {"ok": True, "info": info})
            except Exception as e:
                write_frame(proto_out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        elif op == "predict":
            if runtime is None:
                write_frame(proto_out, {"ok": False, "error": "no policy loaded"})
                continue
            try:
                chunk = runtime.predict(_obs_from_frame(header, arrays))
            except Exception as e:
                write_frame(proto_out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            write_frame(
                proto_out,
                {
                    "ok": True,
                    "step_period": chunk.step_period,
                    "stamp": chunk.stamp,
                    "latency": chunk.latency,
                    "model_id": chunk.model_id,
                    "timing": chunk.timing,
                },
                {"actions": np.asarray(chunk.actions, dtype=np.float64)},
            )
        else:
            write_frame(proto_out, {"ok": False, "error": f"unknown op {op!r}"})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="qvla inference worker process (started by the policy node)")
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0)
    args = parser.parse_args(argv)
    return _serve(args.nice, args.torch_threads)


if __name__ == "__main__":
    sys.exit(main())
