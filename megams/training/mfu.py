"""Peak FLOP/s of this machine, for MFU: measured once on CPU (a large matmul), a table on GPU."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

# dense bf16 tensor-core peak (no sparsity), FLOP/s; fp32 entries are the TF32 peak.
GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
    "V100": {"bf16": 125e12, "fp32": 15.7e12},
}

_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megams", "peak_flops.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, device: str = "cpu", seconds: float = 1.0) -> float:
    """Best achieved FLOP/s of an n x n x n matmul over ~`seconds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def peak_flops(precision: str, device: str = "cpu") -> float:
    """Peak FLOP/s per rank for `precision` ('fp32' | 'bf16' | 'fp16')."""
    kind = "bf16" if precision in ("bf16", "fp16") else "fp32"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, table in GPU_PEAK.items():
            if key in name:
                return table[kind]
        return measure_matmul_flops(torch.bfloat16 if kind == "bf16" else torch.float32, 8192, device)
    key = f"{_cpu_model()}|threads={torch.get_num_threads()}|{kind}"
    cache = {}
    try:
        with open(_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if key not in cache:
        cache[key] = measure_matmul_flops(torch.bfloat16 if kind == "bf16" else torch.float32)
        try:
            os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
            tmp = f"{_CACHE}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, _CACHE)
        except OSError:
            pass
    return cache[key]
