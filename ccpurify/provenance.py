"""What a manifest records about where a result came from: versions, commit, time, hashes."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PROTOCOL_VERSION = "ccpurify-protocol-1 (BackdoorBench-based; docs/protocol.md)"
_PACKAGES = ("ccpurify", "torch", "torch-pruning", "tensorly", "pot", "onnx", "onnxruntime", "numpy", "safetensors")


def versions() -> dict[str, str]:
    """Python and package versions (from distribution metadata: ``tp.__version__`` is stale)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding this package (None outside a git checkout)."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def machine() -> dict[str, str | int]:
    """The CPU's name, its core count and its widest vector extension: onnxruntime's convolutions
    work on 16-channel blocks with AVX-512 and 8-channel ones with AVX2, so the same pruned model's
    latency ratio differs between two machines of one name (docs/limitations.md)."""
    import os

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    simd = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "simd": simd}
