"""The catalog of Azure CPU VM sizes users pick from, checks against it, and prices.

The catalog is `gpt2onnx/data/skus.toml` (package data, the one canonical copy): the
CPU sizes of the Azure ML gpt2 model card's inference allow-list, with vCPUs, memory,
processors and the ISA extensions that decide int8 speed (AVX2, AVX-512, VNNI, AMX).

    >>> from gpt2onnx.bench import skus
    >>> sku = skus.get("Standard_F4s_v2")
    >>> (sku.vcpus, sku.physical_cores, sku.memory_gib)
    (4, 2, 8.0)
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from .. import cpu
from ..artifact import MIN_INFERENCE_VM
from ..errors import Gpt2OnnxError, InvalidRequestError

ISA_FLAGS = tuple(f for f in cpu.ISA_FLAGS if f != "avx_vnni")  # the catalog's columns (Azure does not list AVX-VNNI)
MIN_INFERENCE_VCPUS = MIN_INFERENCE_VM["vcpus"]
MIN_INFERENCE_MEMORY_GIB = float(MIN_INFERENCE_VM["memory_gib"])
RUNTIME_OVERHEAD_GIB = 1.0  # onnxruntime arenas, KV cache, tokenizer, Python
OS_MARGIN = 0.25  # share of VM memory left to the OS and page cache
_GIB = 1024**3


@dataclass(frozen=True)
class Sku:
    """One Azure VM size.

    ISA flags are True/False, or None when they depend on the host the VM lands on.
    """

    name: str
    family: str
    vcpus: int
    memory_gib: float
    processors: tuple[str, ...]
    avx2: bool | None
    avx512f: bool | None
    avx512_vnni: bool | None
    amx: bool | None
    notes: str
    vcpus_per_core: int = 2  # Azure's "vCPU: Core" ratio: 2 on hyper-threaded / SMT series, 1 on DSv2

    @property
    def physical_cores(self) -> int:
        """Physical cores behind the vCPUs: vCPUs / the family's vCPUs per core."""
        return max(1, self.vcpus // self.vcpus_per_core)


@dataclass(frozen=True)
class Prices:
    """VM prices per hour, keyed by SKU name (see bench/prices.example.toml)."""

    currency: str
    per_hour: Mapping[str, float]
    example: bool  # True: placeholder numbers; every cost shown is labelled EXAMPLE


def _isa_value(value: object, where: str) -> bool | None:
    if isinstance(value, bool):
        return value
    if value == "host":
        return None
    raise Gpt2OnnxError(f"{where}: ISA flag must be true, false or \"host\", got {value!r}; fix the catalog")


def _vcpus_per_core(fam: dict, where: str) -> int:
    """A family's vCPUs per physical core: required (no default), 1 or 2."""
    value = fam["vcpus_per_core"]
    if value not in (1, 2) or isinstance(value, bool):
        raise Gpt2OnnxError(f"{where}: {fam['name']}: vcpus_per_core must be 1 or 2, got {value!r}; fix the catalog")
    return value


def _read_catalog_text(path: str | None) -> tuple[str, str]:
    if path is None:
        ref = resources.files("gpt2onnx") / "data" / "skus.toml"
        where = "gpt2onnx/data/skus.toml"
    else:
        ref, where = None, path
    try:
        if ref is not None:
            return ref.read_text(encoding="utf-8"), where
        with open(path, encoding="utf-8") as f:
            return f.read(), where
    except OSError as e:
        raise Gpt2OnnxError(f"{where}: cannot read the SKU catalog ({e.strerror}); reinstall gpt2onnx") from e


def load_catalog(path: str | None = None) -> list[Sku]:
    """Read the SKU catalog.

    Args:
        path: a catalog TOML file; default: the one shipped in the package.

    Returns:
        Every size of every family, in catalog order.

    Raises:
        Gpt2OnnxError: the catalog is missing or malformed.

    >>> names = [s.name for s in load_catalog()]
    >>> "Standard_D4as_v4" in names and "Standard_E64s_v3" in names
    True
    """
    text, where = _read_catalog_text(path)
    try:
        data = tomllib.loads(text)
        out: list[Sku] = []
        for fam in data["family"]:
            isa = {k: _isa_value(fam["isa"][k], f"{where}: {fam['name']}") for k in ISA_FLAGS}
            for size in fam["sizes"]:
                notes = fam["notes"] + (" " + size["notes"] if size.get("notes") else "")
                out.append(Sku(name=str(size["name"]), family=str(fam["name"]), vcpus=int(size["vcpus"]),
                               memory_gib=float(size["memory_gib"]), processors=tuple(fam["processors"]),
                               notes=notes, vcpus_per_core=_vcpus_per_core(fam, where), **isa))
    except tomllib.TOMLDecodeError as e:
        raise Gpt2OnnxError(f"{where}: the SKU catalog is not valid TOML ({e}); fix or reinstall it") from e
    except (KeyError, TypeError, ValueError) as e:
        raise Gpt2OnnxError(f"{where}: malformed SKU catalog entry ({e!r}); fix or reinstall it") from e
    return out


def _norm(name: str) -> str:
    return name.strip().lower().removeprefix("standard_")


def get(name: str) -> Sku:
    """Look a size up by name (case-insensitive, "Standard_" prefix optional).

    Raises:
        InvalidRequestError: unknown name; the message lists close matches.

    >>> get("f8s_v2").name
    'Standard_F8s_v2'
    """
    catalog = load_catalog()
    by_norm = {_norm(s.name): s for s in catalog}
    found = by_norm.get(_norm(name))
    if found is not None:
        return found
    close = difflib.get_close_matches(_norm(name), list(by_norm), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(by_norm[c].name for c in close)}?" if close else "none is close"
    raise InvalidRequestError(
        f"unknown SKU {name!r}; {hint} (list all {len(catalog)} with gpt2onnx.skus.format_catalog())")


def _flag(value: bool | None) -> str:
    return "host" if value is None else ("yes" if value else "no")


def memory_fit(sku: Sku, *, model_bytes: int) -> tuple[bool, str]:
    """Whether a model of `model_bytes` weights runs on `sku` with headroom.

    Needs weights + 1 GiB runtime within 75 % of VM memory (25 % kept for the OS),
    and the model card's minimum inference spec (2 vCPU, 8 GiB).

    >>> memory_fit(get("Standard_F4s_v2"), model_bytes=170 * 1024**2)
    (True, 'yes (1.2 of 6.0 GiB)')
    """
    need = model_bytes / _GIB + RUNTIME_OVERHEAD_GIB
    usable = sku.memory_gib * (1 - OS_MARGIN)
    if sku.vcpus < MIN_INFERENCE_VCPUS or sku.memory_gib < MIN_INFERENCE_MEMORY_GIB:
        return False, f"no: below the card's minimum {MIN_INFERENCE_VCPUS} vCPU / {MIN_INFERENCE_MEMORY_GIB:g} GiB"
    if need > usable:
        return False, f"no: needs {need:.1f} GiB, {usable:.1f} usable"
    return True, f"yes ({need:.1f} of {usable:.1f} GiB)"


def format_catalog(*, model_bytes: int | None = None) -> str:
    """The catalog as a Markdown table.

    Args:
        model_bytes: weights size of a model; adds a "fits" column (see `memory_fit`).

    >>> print(format_catalog().splitlines()[0])
    | SKU | family | vCPU | cores | memory GiB | AVX2 | AVX-512 | VNNI | AMX | processors |
    """
    head = ["SKU", "family", "vCPU", "cores", "memory GiB", "AVX2", "AVX-512", "VNNI", "AMX", "processors"]
    if model_bytes is not None:
        head.append(f"fits {model_bytes / _GIB:.2f} GiB model")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    catalog = load_catalog()
    for s in catalog:
        row = [s.name, s.family, str(s.vcpus), str(s.physical_cores), f"{s.memory_gib:g}",
               *(_flag(getattr(s, f)) for f in ISA_FLAGS), "; ".join(s.processors)]
        if model_bytes is not None:
            row.append(memory_fit(s, model_bytes=model_bytes)[1])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    single = sorted({s.family for s in catalog if s.vcpus_per_core == 1})
    lines.append("host = depends on the host CPU the VM lands on. cores = physical cores: vCPUs / 2 where vCPUs "
                 f"are hyper-threads, vCPUs on {', '.join(single) or 'none'} (one vCPU per core).")
    return "\n".join(lines)


def _vendor(text: str) -> str | None:
    low = text.lower()
    return "AMD" if "amd" in low else ("Intel" if "intel" in low else None)


def check_cpu(sku_name: str, environment: dict) -> list[str]:
    """Warnings where a measured machine does not look like its catalog entry.

    Args:
        sku_name: the SKU the record claims.
        environment: the `environment` dict of a bench record (see `gpt2onnx.results`).

    Returns:
        One line per mismatch; empty when everything matches.

    Raises:
        InvalidRequestError: `sku_name` is not in the catalog.

    >>> env = {"cpu_model": "AMD EPYC 7452", "logical_cores": 4, "physical_cores": 2,
    ...        "isa": {"avx2": True, "avx512f": True}}
    >>> check_cpu("Standard_D4as_v4", env)  # doctest: +ELLIPSIS
    ['Standard_D4as_v4: avx512f detected, but Dasv4 has no avx512f...']
    """
    sku = get(sku_name)
    out: list[str] = []
    logical = environment.get("logical_cores")
    if isinstance(logical, int) and logical != sku.vcpus:
        out.append(f"{sku.name}: {logical} vCPUs detected, catalog says {sku.vcpus}; "
                   "check the SKU name given to the bench run")
    physical = environment.get("physical_cores")
    if isinstance(physical, int) and physical != sku.physical_cores:
        out.append(f"{sku.name}: {physical} physical cores detected, catalog says {sku.physical_cores}")
    # Pinning and quotas limit the process within the machine: compared with the CPUs the
    # machine has (a machine with fewer vCPUs than the SKU is the vCPU line above, not pinning).
    machine = logical if isinstance(logical, int) else sku.vcpus
    affinity = environment.get("affinity")
    if isinstance(affinity, list) and affinity and len(affinity) < min(machine, sku.vcpus):
        out.append(f"{sku.name}: process pinned to {len(affinity)} of the machine's {machine} vCPUs; "
                   "results understate the VM")
    quota = environment.get("cgroup_cpu_quota")
    if isinstance(quota, (int, float)) and quota < min(machine, sku.vcpus):
        out.append(f"{sku.name}: cgroup CPU quota {quota:g} < the machine's {machine} vCPUs; results understate the VM")
    mem = environment.get("memory_gib")
    if isinstance(mem, (int, float)) and not sku.memory_gib * 0.85 <= mem <= sku.memory_gib * 1.05:
        out.append(f"{sku.name}: {mem:.1f} GiB memory detected, catalog says {sku.memory_gib:g}")
    isa = environment.get("isa") or {}
    for flag in ISA_FLAGS:
        want, got = getattr(sku, flag), isa.get(flag)
        if want is None or not isinstance(got, bool) or want == got:
            continue
        if got:
            out.append(f"{sku.name}: {flag} detected, but {sku.family} has no {flag}; is this really {sku.name}?")
        else:
            out.append(f"{sku.name}: {flag} not detected, but {sku.family} has it; "
                       "wrong SKU name, or the hypervisor hides it")
    got_vendor = _vendor(str(environment.get("cpu_model", "")))
    vendors = {_vendor(p) for p in sku.processors}
    if got_vendor and got_vendor not in vendors:
        out.append(f"{sku.name}: CPU {environment.get('cpu_model')!r} is {got_vendor}, "
                   f"{sku.family} runs on {', '.join(sorted(v for v in vendors if v))}")
    return out


def load_prices(path: str) -> Prices:
    """Read a prices TOML file (`currency`, `[price_per_hour]`, optional `example`).

    Raises:
        InvalidRequestError: unreadable, not TOML, or a missing/invalid field.

    >>> p = load_prices("bench/prices.example.toml")
    >>> (p.currency, p.example, p.per_hour["Standard_F4s_v2"] > 0)
    ('USD', True, True)
    """
    fix = "see bench/prices.example.toml"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidRequestError(f"{path}: cannot read prices ({e.strerror}); check the path") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequestError(f"{path}: prices file is not valid TOML ({e}); {fix}") from None
    unknown = set(data) - {"currency", "price_per_hour", "example"}
    if unknown:
        raise InvalidRequestError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in prices; {fix}")
    currency, table, example = data.get("currency"), data.get("price_per_hour"), data.get("example", False)
    if not isinstance(currency, str) or not currency:
        raise InvalidRequestError(f"{path}: prices need a `currency` string; {fix}")
    if not isinstance(table, dict) or not table:
        raise InvalidRequestError(f"{path}: prices need a non-empty [price_per_hour] table; {fix}")
    if not isinstance(example, bool):
        raise InvalidRequestError(f"{path}: `example` must be true or false; {fix}")
    for sku, price in table.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
            raise InvalidRequestError(f"{path}: price of {sku} must be a positive number per hour, got {price!r}")
    return Prices(currency=currency, per_hour=MappingProxyType({k: float(v) for k, v in table.items()}),
                  example=example)
