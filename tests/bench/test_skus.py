"""The SKU catalog: matches the model card's allow-list, lookups, fit, CPU checks."""

from __future__ import annotations

import ast
import os

import pytest

from gpt2onnx.bench import skus
from gpt2onnx.errors import Gpt2OnnxError, InvalidRequestError

from helpers.paths import REPO, shared_path

CARD = ("seeds", "002_c6dbc762f0944603.txt")  # the Azure ML gpt2 model card, in the shared folder
GIB = 1024**3

# Independent of the TOML: Azure's published vCPU / memory (GiB) of each size.
EXPECTED = {
    "Standard_DS3_v2": (4, 14), "Standard_DS4_v2": (8, 28), "Standard_DS5_v2": (16, 56),
    **{f"Standard_D{n}{s}_v4": (n, 4 * n) for n in (4, 8, 16, 32, 48, 64, 96) for s in ("a", "as")},
    **{f"Standard_F{n}s_v2": (n, 2 * n) for n in (4, 8, 16, 32, 48, 64, 72)},
    **{f"Standard_FX{n}mds": (n, 21 * n) for n in (4, 12, 24, 36, 48)},
    **{f"Standard_E{n}s_v3": (n, 8 * n) for n in (2, 4, 8, 16, 32, 48)}, "Standard_E64s_v3": (64, 432),
}
# Independent of the TOML: the "vCPU: Core" column of Azure's compute unit table
# (https://learn.microsoft.com/azure/virtual-machines/acu): DSv2 has no hyper-threading.
VCPUS_PER_CORE = {"DSv2": 1, "Dav4": 2, "Dasv4": 2, "Fsv2": 2, "FX": 2, "Esv3": 2}


def card_cpu_allow_list() -> set[str]:
    with open(shared_path(*CARD), encoding="utf-8") as f:
        line = next(ln for ln in f if ln.startswith("inference_compute_allow_list"))
    names = ast.literal_eval(line.split(":", 1)[1].strip())
    return {n for n in names if not n.startswith(("Standard_NC", "Standard_ND", "Standard_NV"))}


def test_catalog_is_exactly_the_cards_cpu_allow_list():
    allowed = card_cpu_allow_list()
    assert len(allowed) == 36
    assert {s.name for s in skus.load_catalog()} == allowed


def test_vcpus_memory_and_cores():
    catalog = {s.name: s for s in skus.load_catalog()}
    assert set(catalog) == set(EXPECTED)
    for name, (vcpus, mem) in EXPECTED.items():
        sku = catalog[name]
        assert (sku.vcpus, sku.memory_gib) == (vcpus, mem), name
        assert sku.physical_cores == vcpus // VCPUS_PER_CORE[sku.family], name
    assert catalog["Standard_DS3_v2"].physical_cores == 4 and catalog["Standard_F4s_v2"].physical_cores == 2


def test_isa_by_family():
    for sku in skus.load_catalog():
        assert sku.avx2 is True and sku.amx is False, sku.name
        assert sku.notes and sku.processors
        if sku.family in ("Dav4", "Dasv4"):
            assert (sku.avx512f, sku.avx512_vnni) == (False, False)
            assert all("AMD EPYC" in p for p in sku.processors)
        elif sku.family == "Fsv2":
            assert (sku.avx512f, sku.avx512_vnni) == (True, None)  # VNNI from Cascade Lake on
        elif sku.family == "FX":
            assert (sku.avx512f, sku.avx512_vnni) == (True, True)
        else:
            assert sku.family in ("DSv2", "Esv3") and sku.avx512f is None  # depends on host


def test_get_is_lenient_about_case_and_prefix():
    assert skus.get("standard_f4s_v2").name == "Standard_F4s_v2"
    assert skus.get("D4as_v4").name == "Standard_D4as_v4"


def test_get_unknown_lists_close_matches():
    with pytest.raises(InvalidRequestError) as e:
        skus.get("Standard_F4s_v3")
    msg = str(e.value)
    assert "unknown SKU 'Standard_F4s_v3'" in msg and "Standard_F4s_v2" in msg and "\n" not in msg
    with pytest.raises(InvalidRequestError, match="none is close"):
        skus.get("Standard_XYZ123")


def test_format_catalog_table_and_fit_column():
    table = skus.format_catalog()
    assert all(name in table for name in EXPECTED)
    assert "| Standard_D4as_v4 | Dasv4 | 4 | 2 | 16 | yes | no | no | no |" in table
    assert "| Standard_DS3_v2 | DSv2 | 4 | 4 | 14 | yes | host | host | no |" in table
    assert "vCPUs on DSv2 (one vCPU per core)" in table
    small = skus.format_catalog(model_bytes=170 * 10**6)  # gpt2 int8
    row = next(ln for ln in small.splitlines() if ln.startswith("| Standard_F4s_v2 |"))
    assert row.endswith("yes (1.2 of 6.0 GiB) |")
    big = skus.format_catalog(model_bytes=10 * GIB)
    f4 = next(ln for ln in big.splitlines() if ln.startswith("| Standard_F4s_v2 |"))
    e64 = next(ln for ln in big.splitlines() if ln.startswith("| Standard_E64s_v3 |"))
    assert "no: needs 11.0 GiB, 6.0 usable" in f4 and "yes (11.0 of 324.0 GiB)" in e64


def test_memory_fit_applies_the_cards_minimum_spec():
    tiny = skus.Sku(name="Standard_X1", family="X", vcpus=1, memory_gib=64, processors=("Intel",),
                    avx2=True, avx512f=False, avx512_vnni=False, amx=False, notes="")
    ok, why = skus.memory_fit(tiny, model_bytes=1)
    assert not ok and "below the card's minimum 2 vCPU / 8 GiB" in why
    ok, _ = skus.memory_fit(skus.get("Standard_F4s_v2"), model_bytes=int(4.9 * GIB))  # 5.9 of 6.0
    assert ok
    ok, _ = skus.memory_fit(skus.get("Standard_F4s_v2"), model_bytes=int(5.1 * GIB))
    assert not ok


def env(**over) -> dict:
    base = {"cpu_model": "Intel(R) Xeon(R) Platinum 8272CL CPU @ 2.60GHz", "physical_cores": 2,
            "logical_cores": 4, "memory_gib": 7.7, "affinity": [0, 1, 2, 3], "cgroup_cpu_quota": None,
            "isa": {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False, "amx": False}}
    return {**base, **over}


def test_check_cpu_matching_machine_has_no_warnings():
    assert skus.check_cpu("Standard_F4s_v2", env()) == []
    # Host-dependent flags never warn either way.
    no512 = env(memory_gib=14.0, physical_cores=4,  # a DS3_v2: 4 vCPUs on 4 cores
                isa={"avx2": True, "avx512f": False, "avx512_vnni": False, "amx": False})
    assert skus.check_cpu("Standard_DS3_v2", no512) == []


def test_a_ds3_v2_with_4_vcpus_on_4_cores_matches():
    """DSv2 has one vCPU per core: a real DS3_v2 (4 vCPUs, 4 cores, 14 GiB, Intel) is no mismatch."""
    ds3 = env(logical_cores=4, physical_cores=4, memory_gib=13.7,
              isa={"avx2": True, "avx512f": True, "avx512_vnni": True, "amx": False})
    assert skus.check_cpu("Standard_DS3_v2", ds3) == []
    warnings = skus.check_cpu("Standard_DS3_v2", dict(ds3, physical_cores=2))  # what a hyper-threaded VM shows
    assert warnings == ["Standard_DS3_v2: 2 physical cores detected, catalog says 4"]


@pytest.mark.parametrize("text, match", [
    ("", "vcpus_per_core"), ("vcpus_per_core = 4\n", "vcpus_per_core must be 1 or 2, got 4"),
])
def test_every_family_states_its_vcpus_per_core(tmp_path, text, match):
    path = tmp_path / "skus.toml"
    path.write_text('[[family]]\nname = "X"\nprocessors = ["Intel"]\nnotes = ""\n' + text
                    + 'isa = {avx2 = true, avx512f = true, avx512_vnni = true, amx = false}\n'
                    + 'sizes = [{name = "Standard_X4", vcpus = 4, memory_gib = 16}]\n')
    with pytest.raises(Gpt2OnnxError, match=match):
        skus.load_catalog(str(path))


def test_check_cpu_warns_on_mismatch():
    amd = env(cpu_model="AMD EPYC 7452 32-Core Processor", memory_gib=15.6,
              isa={"avx2": True, "avx512f": True, "avx512_vnni": False, "amx": False})
    (w,) = skus.check_cpu("Standard_D4as_v4", amd)  # avx512 on a Dav4
    assert w.startswith("Standard_D4as_v4: avx512f detected, but Dasv4 has no avx512f")
    warnings = skus.check_cpu("Standard_D4as_v4", env(memory_gib=15.6))
    assert any("is Intel, Dasv4 runs on AMD" in x for x in warnings)
    warnings = skus.check_cpu("Standard_F8s_v2", env())
    assert any("4 vCPUs detected, catalog says 8" in x for x in warnings)
    assert any("2 physical cores detected, catalog says 4" in x for x in warnings)
    assert any("7.7 GiB memory detected, catalog says 16" in x for x in warnings)
    fx = env(memory_gib=82.0, isa={"avx2": True, "avx512f": True, "avx512_vnni": False, "amx": False})
    assert any("avx512_vnni not detected, but FX has it" in x for x in skus.check_cpu("Standard_FX4mds", fx))
    pinned = skus.check_cpu("Standard_F4s_v2", env(affinity=[0, 1], cgroup_cpu_quota=2.0))
    assert any("pinned to 2 of the machine's 4 vCPUs" in x for x in pinned)
    assert any("cgroup CPU quota 2 < the machine's 4 vCPUs" in x for x in pinned)


def test_a_smaller_machine_is_one_vcpu_line_not_pinning():
    """A 2-vCPU machine benched as Standard_F4s_v2: its 2 usable vCPUs are all it has, not a pinning."""
    small = env(logical_cores=2, physical_cores=1, affinity=[0, 1], cgroup_cpu_quota=None, memory_gib=7.7)
    warnings = skus.check_cpu("Standard_F4s_v2", small)
    assert any("2 vCPUs detected, catalog says 4" in w for w in warnings)
    assert not any("pinned" in w or "quota" in w for w in warnings)
    quota = skus.check_cpu("Standard_F4s_v2", dict(small, cgroup_cpu_quota=1.0))
    assert any("cgroup CPU quota 1 < the machine's 2 vCPUs" in w for w in quota)


def test_check_cpu_unknown_sku():
    with pytest.raises(InvalidRequestError, match="unknown SKU"):
        skus.check_cpu("Standard_Q4", env())


def test_the_catalog_is_package_data_only():
    """One catalog, shipped in the package (found when installed); no copy or pointer beside it."""
    assert not os.path.exists(os.path.join(REPO, "bench", "skus.toml"))
    assert skus.load_catalog(os.path.join(REPO, "gpt2onnx", "data", "skus.toml")) == skus.load_catalog()


@pytest.mark.parametrize("text, match", [
    ("family = [", "not valid TOML"),
    ('[[family]]\nname = "X"\n', "malformed SKU catalog entry"),
    ('[[family]]\nname = "X"\nprocessors = []\nnotes = ""\nsizes = []\n'
     'isa = {avx2 = "maybe", avx512f = true, avx512_vnni = true, amx = false}\n', "ISA flag must be"),
])
def test_bad_catalog_file(tmp_path, text, match):
    path = tmp_path / "skus.toml"
    path.write_text(text)
    with pytest.raises(Gpt2OnnxError, match=match):
        skus.load_catalog(str(path))
    with pytest.raises(Gpt2OnnxError, match="cannot read the SKU catalog"):
        skus.load_catalog(str(tmp_path / "missing.toml"))
