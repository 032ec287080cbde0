"""Helpers shared by the benchmark scripts (one script per op family, see DESIGN.md).

Timing is ``triton.testing.do_bench`` (median) over a callable that rotates through several input
sets; peak memory is the ``torch.cuda.max_memory_allocated`` rise over what was allocated before
one call; an out-of-memory or any other failure is recorded, never raised, so one bad variant
does not end a long run.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def parse_sizes(text):
    """'8k,32k,131072' -> [8192, 32768, 131072] (k = 1024)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if part.endswith("k") else part) * mult
        except ValueError:
            raise ValueError(f"size {part!r} is not an int or an int followed by k") from None
        if value < 1:
            raise ValueError(f"size {part!r} must be >= 1")
        sizes.append(value)
    if not sizes:
        raise ValueError("no size given")
    return sizes


def size_label(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def env_info():
    """GPU name, versions, date and commit: the header of every results file."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import starshard
        info["starshard"] = starshard.__version__
    except ImportError:
        info["starshard"] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def rotating(fn, input_sets):
    """A no-argument callable: each call runs ``fn(*s)`` for the next input set ``s`` in turn."""
    it = itertools.cycle(input_sets)
    return lambda: fn(*next(it))


def _error_record(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    oom = "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError"
    return {"status": "oom" if oom else "error", "error": text[:1500]}


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(fn, *, warmup_ms=25, rep_ms=100):
    """Run ``fn`` once to warm up (compile, autotune, table build), once for peak memory, then time it.

    Returns ``{"status": "ok"|"oom"|"error", "time_ms", "peak_mib", "error"}``; time is the
    do_bench median in milliseconds.
    """
    import torch
    import triton.testing

    rec = {"status": "ok", "time_ms": None, "peak_mib": None, "error": None}
    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rec["time_ms"] = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                      return_mode="median"))
    except Exception as exc:  # OOM, compile failures: recorded per variant
        rec.update(_error_record(exc))
    free_memory()
    return rec


def capture_graph(warmup, body, device=None):
    """Run ``warmup`` on a side stream (kernels compiled, tables built outside the capture),
    then capture ``body`` in a CUDA graph; returns (graph, what ``body`` returned)."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warmup()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


def try_call(fn):
    """(result, None) or (None, error record) for a one-off call such as a correctness check."""
    try:
        return fn(), None
    except Exception as exc:
        return None, _error_record(exc)
    finally:
        free_memory()


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, spec=".2f", missing="-"):
    return missing if x is None else format(x, spec)
