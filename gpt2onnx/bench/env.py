"""The machine a benchmark runs on: CPU, ISA (AMX usable?), cgroup quota, memory, versions, git revision, bandwidth.

For example::

    from gpt2onnx.bench.env import environment, measure_bandwidth
    env = environment(memory_bandwidth_gbs=measure_bandwidth(threads=4))
    env["cpu_model"], env["isa"]["avx512_vnni"], env["memory_bandwidth_gbs"]
    # -> ('Intel(R) Xeon(R) Platinum 8370C CPU @ 2.80GHz', True, 21.37)

`environment` is a bench record's ``environment`` (schema in `gpt2onnx.results`); the
bandwidth is the denominator of the bench's bandwidth floor (see `gpt2onnx.bench`).
Nothing here needs more than the runtime install: numpy for the bandwidth, and the
git revision is read from ``.git`` directly, with no git binary.
"""

from __future__ import annotations

import os
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor

from .. import cpu
from .._version import package_versions

# OpenVINO "as on Cascade Lake" (the openvino-capped baseline, gpt2onnx.bench.ovgenai)
CAPPED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}  # oneDNN's kernels up to Cascade Lake's ISA
CAPPED_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16, as on Cascade Lake

BANDWIDTH_MIB = 1024  # the array summed to measure memory bandwidth (far beyond any cache)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gpt2onnx/


def git_revision() -> str | None:
    """The commit of the gpt2onnx checkout this package runs from, or None (installed wheel).

    Reads ``.git`` beside the package directly (what ``git rev-parse HEAD`` prints),
    so it needs no git binary.
    """
    git = os.path.join(os.path.dirname(PACKAGE_DIR), ".git")
    try:
        if os.path.isfile(git):  # a worktree: "gitdir: <path>"
            with open(git, encoding="utf-8") as f:
                git = os.path.join(os.path.dirname(git), f.read().strip().removeprefix("gitdir:").strip())
        with open(os.path.join(git, "HEAD"), encoding="utf-8") as f:
            head = f.read().strip()
        if re.fullmatch(r"[0-9a-f]{40,64}", head):
            return head
        ref = head.removeprefix("ref:").strip()
        common = git
        if os.path.isfile(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir"), encoding="utf-8") as f:
                common = os.path.join(git, f.read().strip())
        for root in (git, common):
            path = os.path.join(root, ref)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs"), encoding="utf-8") as f:
            for line in f:
                sha, _, name = line.strip().partition(" ")
                if name == ref:
                    return sha
    except OSError:
        return None
    return None


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 0.0


def versions() -> dict[str, str]:
    """Versions a bench record carries (whatever of these is installed)."""
    return package_versions(("onnxruntime", "numpy", "tokenizers", "onnx", "torch", "transformers", "optimum",
                             "optimum-onnx"))


def environment(*, memory_bandwidth_gbs: float | None = None) -> dict:
    """This machine as a bench record's `environment` (see `gpt2onnx.results`)."""
    return {
        "cpu_model": cpu.cpu_model(), "physical_cores": cpu.physical_cores(), "logical_cores": os.cpu_count() or 1,
        "isa": cpu.isa_flags(), "cgroup_cpu_quota": cpu.cgroup_cpu_quota(), "affinity": cpu.allowed_cpus(),
        "memory_gib": round(_memory_gib(), 2), "os": platform.platform(), "python": platform.python_version(),
        "versions": versions(), "git_revision": git_revision(),
        "memory_bandwidth_gbs": None if memory_bandwidth_gbs is None else round(memory_bandwidth_gbs, 2),
        "amx_usable": amx_usable(),
    }


_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18  # x86-64 Linux


def amx_usable() -> bool | None:
    """Whether this process may use AMX: None on a CPU without it, False when AMX is switched off.

    onnxruntime's MLAS and oneDNN ask Linux for the AMX tile state
    (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``) before they use AMX, and fall
    back to their AVX-512 VNNI kernels when it is refused. This asks the same way, through
    libc's ``syscall`` as they do, so a preload that refuses it (``../shared/tools/noamx.c``,
    "as on Cascade Lake"), an old kernel or a seccomp filter all read as False: the
    figures of such a run are not this machine's AMX figures. Granting it is harmless
    (the libraries ask for it anyway); the answer holds for the bench's workers, which
    inherit the environment (``LD_PRELOAD``).
    """
    if not cpu.isa_flags().get("amx"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        got = libc.syscall(ctypes.c_long(_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                           ctypes.c_long(_XFEATURE_XTILEDATA))
    except (OSError, AttributeError):
        return False
    return got == 0


def measure_bandwidth(*, threads: int, mib: int = BANDWIDTH_MIB, rounds: int = 5) -> float:
    """Memory read bandwidth in GB/s: numpy sums `mib` MiB of float32 split over `threads` threads.

    numpy releases the GIL in `sum`, so the chunks are read in parallel. Best of `rounds`.
    """
    import numpy as np

    a = np.ones(mib * 2**20 // 4, np.float32)  # ones, not empty: every page is really mapped
    chunks = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9
