"""What CPU this process may use: physical cores (affinity and cgroup quota), ISA flags.

onnxruntime sizes its thread pool from the logical CPUs of the machine and ignores
cgroup quotas, which oversubscribes containers and hyper-threaded VMs (an Azure vCPU is
a hyper-thread). `physical_cores()` is what the runtime uses by default.
"""

from __future__ import annotations

import math
import os
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx")  # the kernels' ISA; "amx" = amx_int8


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def allowed_cpus() -> list[int]:
    """Logical CPUs in this process's affinity mask."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max or v1 cfs quota), or None when unlimited."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    q, p = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if q and p and int(q) > 0:
        return int(q) / int(p)
    return None


def physical_cores() -> int:
    """Physical cores this process may use: affinity mask mapped to cores, capped by the cgroup quota."""
    cpus = allowed_cpus()
    cores = set()
    for c in cpus:
        core = _read(f"/sys/devices/system/cpu/cpu{c}/topology/core_id")
        pkg = _read(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id")
        cores.add((pkg, core) if core is not None else ("cpu", c))
    n = len(cores) or 1
    quota = cgroup_cpu_quota()
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return n


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def isa_flags() -> dict[str, bool]:
    """The ISA extensions that decide which int8/fp32 kernels run."""
    info = _read("/proc/cpuinfo") or ""
    flags: set[str] = set()
    for line in info.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f: (f + "_int8" if f == "amx" else f) in flags for f in ISA_FLAGS}


THREADS_ENV = "GPT2ONNX_THREADS"  # intra-op threads of a Generator built by a deployment or integration


def threads_from_env(environ=None) -> int | None:
    """Intra-op threads from ``GPT2ONNX_THREADS``; None (unset or empty) means physical cores.

    The one parser of that variable (Azure ML entries, MLflow, Ray).

    >>> threads_from_env({"GPT2ONNX_THREADS": "4"})
    4
    >>> threads_from_env({}) is None
    True
    """
    from .errors import InvalidRequestError

    value = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequestError(f"{THREADS_ENV}={value!r} is not a positive integer; set it to the number of "
                                  "intra-op threads per process (e.g. 4) or unset it for the physical cores")
    return int(value)


_warned: set[int] = set()


def warn_oversubscribed(threads: int) -> bool:
    """Log a warning (once per thread count) when `threads` exceeds the cores this process may use.

    More intra-op threads than cores makes onnxruntime's spinning workers fight for the
    cores: measured 17x slower at 16 threads on 2 cores. Returns whether it warned.
    """
    import logging

    cores = physical_cores()
    if threads <= max(cores, len(allowed_cpus())) or threads in _warned:
        return False
    _warned.add(threads)
    logging.getLogger("gpt2onnx").warning(
        "%d threads on %d physical cores (%d logical CPUs) this process may use: expect a large slow-down; "
        "use --threads %d or fewer", threads, cores, len(allowed_cpus()), cores)
    return True
