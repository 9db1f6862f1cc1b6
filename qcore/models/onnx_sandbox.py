"""The native code an imported file reaches, in a child process with memory and time bounds.

onnx's version converter and ONNX Runtime are C++ fed a hostile file: a crash, a hang or a runaway
allocation there must refuse the file in one line, never take the server (and every other session on it)
down. So the import runs them here, in a fresh interpreter that imports numpy, onnx and onnxruntime only
(about 1 s to start, 60 MB), under RLIMIT_AS and RLIMIT_CPU and a wall-clock deadline, and the parent
keeps everything Python: the bounds, the conversion to torch, the comparison.

The child reads one request on stdin and writes one reply on stdout, each a JSON line followed by raw
arrays (never a pickle: a child that a file subverted can only send numbers, which the parent bounds and
checks). The request: the file as ONNX Runtime should run it, the model to upgrade (opsets 7 to 10),
1,000 training and 1,000 test images as float32 standardized by the dataset, and the pixel conventions
to try. The reply: the upgraded model, ONNX Runtime's accuracy under each convention on the training
images, and its scores on the test images under the chosen one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MEMORY_BYTES = 2 * 2**30  # address space of the child: onnxruntime with its arenas, and the batches
SECONDS = 120  # wall clock for the child, start included
HEADER_BYTES = 65_536
MAX_UPGRADED_BYTES = 16 * 2**20  # the upgraded model (the file itself is at most 4.2 MB)
UPGRADE_OPSET = 11


class SandboxError(Exception):
    """The child refused the file, or failed: one line saying why."""


@dataclass(frozen=True)
class SandboxResult:
    upgraded: bytes | None  # the model at UPGRADE_OPSET, when the file's opset was older
    accuracies: dict[str, float]  # ONNX Runtime's float accuracy on the training images, per convention
    chosen: str
    scores: np.ndarray  # float32 [test images, 10]: ONNX Runtime's output under the chosen convention


def _command() -> list[str]:
    """The child's command line (tests replace it with one that crashes, hangs or allocates)."""
    return [sys.executable, "-m", "qcore.models.onnx_sandbox"]


def _limit(pid: int) -> None:
    """The child's bounds, set from outside (prlimit) before it is sent anything: a server's threads make
    code between fork and exec unsafe, and until the request arrives the child only starts up."""
    import resource

    resource.prlimit(pid, resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.prlimit(pid, resource.RLIMIT_CPU, (SECONDS, SECONDS + 5))
    resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind


def run_in_sandbox(
    original: bytes,
    to_upgrade: bytes | None,
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    conventions: dict[str, tuple[float, float, float, float]],
    choose: str,
    layout: tuple[int, ...],
    float64: bool,
    scores: str,
    batch: int,
    threads: int,
) -> SandboxResult:
    """ONNX Runtime (and the version converter) on a file in a bounded child process. `conventions` maps
    each pixel convention to (dataset mean, dataset std, convention mean, convention std): an image x
    standardized by the dataset is fed as ((x * std + mean) - c_mean) / c_std. `choose` is a convention
    or "auto" (the most accurate on `train`). Raises SandboxError with one line; qcore.cancel's
    checkpoint() is polled while waiting, and the child is killed when the asker leaves."""
    import numpy as np

    from qcore.cancel import Cancelled, checkpoint

    arrays = [
        np.ascontiguousarray(train, np.float32),
        np.ascontiguousarray(train_labels, np.int64),
        np.ascontiguousarray(test, np.float32),
    ]
    header = {
        "original": len(original),
        "upgrade": 0 if to_upgrade is None else len(to_upgrade),
        "shapes": [list(a.shape) for a in arrays],
        "conventions": conventions,
        "choose": choose,
        "layout": list(layout),
        "float64": float64,
        "scores": scores,
        "batch": batch,
        "threads": threads,
    }
    payload = b"".join(
        [json.dumps(header).encode() + b"\n", original, to_upgrade or b"", *(a.tobytes() for a in arrays)]
    )
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        _command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment
    )
    try:
        _limit(child.pid)
    except OSError:
        child.kill()
        child.wait()
        raise SandboxError("the server could not bound the import's process") from None
    # The request is written and the reply read by two threads while this one waits, polling for the
    # asker leaving and the deadline (Popen.communicate cannot resume writing after a timeout).
    reply: list[bytes] = []

    def send() -> None:
        try:
            child.stdin.write(payload)  # type: ignore[union-attr]
            child.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            pass  # the child died early: its exit status says why

    writer = threading.Thread(target=send, daemon=True)
    # at most what a well-formed reply holds, and one byte more (a longer one is malformed)
    most = HEADER_BYTES + MAX_UPGRADED_BYTES + 4 * 10 * len(test) + 1
    reader = threading.Thread(target=lambda: reply.append(child.stdout.read(most)), daemon=True)  # type: ignore[union-attr]
    writer.start()
    reader.start()
    deadline = time.monotonic() + SECONDS
    try:
        while child.poll() is None:
            checkpoint()  # an upload whose session has left stops here
            if time.monotonic() > deadline:
                raise SandboxError(f"ONNX Runtime did not finish the file within {SECONDS} s")
            time.sleep(0.05)
    except (Cancelled, SandboxError):
        child.kill()
        raise
    finally:
        child.wait()
        writer.join()
        reader.join()
        for stream in (child.stdin, child.stdout):
            if stream is not None and not stream.closed:
                stream.close()
    output = reply[0] if reply else b""
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else "?"
        if name in ("SIGKILL", "SIGXCPU"):
            raise SandboxError(f"ONNX Runtime did not finish the file within its time bound ({name})")
        raise SandboxError(f"ONNX Runtime or onnx's converter crashed on the file ({name}); the server is unharmed")
    return _parse_reply(output, child.returncode, len(test), list(conventions), choose)


def _parse_reply(output: bytes, status: int, images: int, conventions: list[str], choose: str) -> SandboxResult:
    """The child's reply, every field bounded and typed (it processed a hostile file)."""
    import numpy as np

    line, _, rest = output.partition(b"\n")
    try:
        reply = json.loads(line[:HEADER_BYTES]) if len(line) <= HEADER_BYTES else None
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise SandboxError(
            f"ONNX Runtime ended without an answer on the file (exit {status}: past its "
            f"{MEMORY_BYTES / 2**30:.0f} GB bound, or an error)"
        )
    if "error" in reply:
        error = reply["error"]
        raise SandboxError(" ".join(error.split())[:200] if isinstance(error, str) else "ONNX Runtime refused the file")
    upgraded_bytes, accuracies, chosen = reply.get("upgraded"), reply.get("accuracies"), reply.get("chosen")
    expected = images * 10 * 4
    if (
        not isinstance(upgraded_bytes, int)
        or not 0 <= upgraded_bytes <= MAX_UPGRADED_BYTES
        or len(rest) != upgraded_bytes + expected
        or not isinstance(accuracies, dict)
        or sorted(accuracies) != sorted(conventions)
        or not all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in accuracies.values())
        or chosen not in conventions
        or (choose != "auto" and chosen != choose)
    ):
        raise SandboxError("ONNX Runtime's answer on the file was malformed")
    scores = np.frombuffer(rest[upgraded_bytes:], dtype=np.float32).reshape(images, 10).copy()
    return SandboxResult(rest[:upgraded_bytes] or None, accuracies, chosen, scores)


# --- the child -------------------------------------------------------------------------------------------
def _read_exactly(stream, count: int) -> bytes:  # type: ignore[no-untyped-def]
    data = stream.read(count)
    if len(data) != count:
        raise ValueError("a short request")
    return data


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:150] + ("…" if len(text) > 150 else "")


def _serve(stdin, stdout) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from qcore.models.onnx_runtime import onnxruntime_session

    header = json.loads(stdin.readline(HEADER_BYTES))
    original = _read_exactly(stdin, header["original"])
    to_upgrade = _read_exactly(stdin, header["upgrade"]) if header["upgrade"] else None
    shapes = header["shapes"]
    train = np.frombuffer(_read_exactly(stdin, 4 * int(np.prod(shapes[0]))), np.float32).reshape(shapes[0])
    labels = np.frombuffer(_read_exactly(stdin, 8 * int(np.prod(shapes[1]))), np.int64).reshape(shapes[1])
    test = np.frombuffer(_read_exactly(stdin, 4 * int(np.prod(shapes[2]))), np.float32).reshape(shapes[2])

    upgraded = b""
    if to_upgrade is not None:
        import onnx
        from onnx import version_converter

        model = onnx.ModelProto()
        model.ParseFromString(to_upgrade)
        try:
            upgraded = version_converter.convert_version(model, UPGRADE_OPSET).SerializeToString()
        except Exception as error:  # noqa: BLE001 - onnx's C++ raises its own types (ValidationError, ...)
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = _one_line(ValueError(lines[-1])) if lines else type(error).__name__
            opset = max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)
            raise ValueError(
                f"the opset {opset} file could not be converted to opset {UPGRADE_OPSET} ({reason})"
            ) from None
    try:
        session = onnxruntime_session(original, header["threads"])
        scores_name = header["scores"]  # the parent's choice of the file's outputs: the one of 10 scores
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types for bad models
        raise ValueError(f"ONNX Runtime cannot run the file ({_one_line(error)})") from None
    input_name, layout, step = session.get_inputs()[0].name, header["layout"], header["batch"]
    dtype = np.float64 if header["float64"] else np.float32

    def scores(images: np.ndarray, convention: str) -> np.ndarray:
        mean, std, c_mean, c_std = header["conventions"][convention]
        fed = ((images * std + mean) - c_mean) / c_std
        if layout[0] == 3:
            fed = np.repeat(fed, 3, axis=1)
        fed = fed.reshape(len(images), *layout).astype(dtype)
        try:
            out = [session.run([scores_name], {input_name: fed[i : i + step]})[0] for i in range(0, len(fed), step)]
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"ONNX Runtime cannot run the file ({_one_line(error)})") from None
        return np.concatenate(out).astype(np.float32).reshape(len(images), 10)

    accuracies = {
        convention: float((scores(train, convention).argmax(1) == labels).mean())
        for convention in header["conventions"]
    }
    # auto: the most accurate, the first of equals in the listed order (the dataset's own first)
    chosen = max(accuracies, key=lambda name: accuracies[name]) if header["choose"] == "auto" else header["choose"]
    reply = {"upgraded": len(upgraded), "accuracies": accuracies, "chosen": chosen}
    stdout.write(json.dumps(reply).encode() + b"\n")
    stdout.write(upgraded)
    stdout.write(scores(test, chosen).tobytes())


def main() -> None:  # pragma: no cover - the child; its behaviour is tested through run_in_sandbox
    try:
        _serve(sys.stdin.buffer, sys.stdout.buffer)
    except MemoryError:
        sys.stdout.buffer.write(json.dumps({"error": "ONNX Runtime ran out of memory on the file"}).encode() + b"\n")
    except Exception as error:  # noqa: BLE001 - every failure on a hostile file is one line to the parent
        sys.stdout.buffer.write(json.dumps({"error": _one_line(error)}).encode() + b"\n")
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
