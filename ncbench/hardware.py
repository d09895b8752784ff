"""What the machine does well, probed once per process: the one place that decides bf16 or fp32.

torch's CPU bf16 matmul is fast only where the CPU multiplies bf16 natively (Intel AMX, or the
AVX-512 BF16 extension of Cooper Lake and AMD Zen 4). Elsewhere oneDNN emulates it: on an
AVX2-only AMD EPYC the nc7 encoder ran 64x slower in bf16 than in fp32.
``torch.backends.cpu.get_cpu_capability()`` does not tell (it says AVX512 on both Zen 4 and
Sapphire Rapids, and oneDNN can be capped below what the CPU has), so a CPU that claims bf16 is
confirmed by timing one small matmul in each precision.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # /proc/cpuinfo names of native bf16
BF16_GAIN = 0.8  # bf16 loses precision: take it only when its matmul is clearly faster


def cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags of /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return None


def cpu_model() -> str:
    """The CPU's name with its family and model numbers ("AMD EPYC (family 25, model 17)": a
    virtual machine often shows a generic name, and the numbers tell Zen 3 from Zen 4), or the
    architecture where the system does not say."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
        )
    except OSError:
        fields = {}
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
    return fields["model name"] + numbers


def bf16_matmul_is_faster(*, rows: int = 256, inner: int = 512, repeats: int = 3) -> bool:
    """Time one (rows, inner) @ (inner, inner) matmul in fp32 and in bf16; True when bf16's best
    time is at most ``BF16_GAIN`` of fp32's. About 10 ms where bf16 is native, well under a second
    where it is emulated (the first slow bf16 call ends the test).

    On one thread, in that thread's CPU time: wall time on all threads also counts the waits for a
    core that another thread of the process holds (an attack's file prefetch, say), which can make
    a native bf16 product look no faster than fp32."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, inner, generator=generator)
    right = torch.randn(inner, inner, generator=generator)

    # A thread's CPU time where the system counts it finely (Linux, macOS: nanoseconds), else wall
    # time (Windows counts thread time in 15.6 ms steps, longer than these products).
    fine = time.get_clock_info("thread_time").resolution <= 1e-6
    clock = time.thread_time if fine else time.perf_counter

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        started = clock()
        torch.mm(a, b)
        return clock() - started

    left16, right16 = left.bfloat16(), right.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Warm-up: first calls pick and build kernels. oneDNN compiles its bf16 kernel on the
        # first call, which alone can exceed the emulation threshold below (measured: a wrong
        # "emulated" verdict on Zen 4 in one process of ten without this).
        timed(left, right)
        timed(left16, right16)
        fp32 = min(timed(left, right) for _ in range(repeats))
        if timed(left16, right16) > 10 * fp32 / BF16_GAIN:
            return False  # emulated: no need to time it again
        bf16 = min(timed(left16, right16) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return bf16 <= BF16_GAIN * fp32


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively and torch uses it (cached for the process).

    No bf16 flag in /proc/cpuinfo: False without timing anything. A flag, or no flags to read:
    the calibration of :func:`bf16_matmul_is_faster` decides.
    """
    flags = cpu_flags()
    if flags is not None and not flags & BF16_CPU_FLAGS:
        return False
    return bf16_matmul_is_faster()


def fast_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls pay off on ``device`` (a CUDA GPU that supports bf16, or see
    :func:`cpu_has_fast_bf16`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def matmul_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype for rough products on ``device`` (a shortlist, not a ranking): bf16 where it pays
    off (:func:`fast_bf16`), else fp32. torch's CPU bf16 product rounds its output to bf16 as
    well, so exact comparisons stay fp32: bf16 slot-alignment products took nc47's
    re-identification from 93.0% to 5.0% (benchmarks/RESULTS.md)."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def pick_device(device: str | None) -> str:
    """``auto`` / None -> ``cuda`` when torch sees a CUDA device, else ``cpu``; refuse an
    unavailable or unknown device with one line (every attack, encoder and CLI resolves here)."""
    from ncbench.errors import NcbenchError

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NcbenchError(f"device {device!r} requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise NcbenchError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


def machine_description(device: str | torch.device = "cpu") -> dict[str, str | int]:
    """What a benchmark records next to its numbers: CPU model, torch's CPU capability, whether
    bf16 is fast here, threads, and the GPU when ``device`` is one."""
    flags = cpu_flags() or frozenset()
    described: dict[str, str | int] = {
        "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": ",".join(sorted(flags & BF16_CPU_FLAGS)) or "none",
        "cpu_bf16_fast": "yes" if cpu_has_fast_bf16() else "no",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.device(device).type == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
    return described
