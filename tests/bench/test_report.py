"""The merged report: tables, ratios, recommendations, honesty labels, plots, errors."""

from __future__ import annotations

import json
import os
import sys

import pytest

from gpt2onnx.bench import record as results, report
from gpt2onnx.errors import ArtifactError, Gpt2OnnxError, InvalidRequestError

from helpers.paths import BENCH_FIXTURES as FIXTURES, REPO

NAMES = ("f4s_v2.json", "d4as_v4.json", "e4s_v3.json")
F4S_CPU = "Intel(R) Xeon(R) Platinum 8272CL CPU @ 2.60GHz"


def fixture(name: str) -> dict:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return json.load(f)


def three() -> list[str]:
    return [os.path.join(FIXTURES, n) for n in NAMES]


def write(tmp_path, name: str, rec: dict) -> str:
    path = str(tmp_path / name)
    results.dump(rec, path)
    return path


def prices(tmp_path, table: dict, *, currency: str = "EUR") -> str:
    path = tmp_path / "prices.toml"
    path.write_text(f'currency = "{currency}"\n[price_per_hour]\n'
                    + "".join(f"{k} = {v}\n" for k, v in table.items()))
    return str(path)


def tables(md: str) -> list[tuple[str, list[dict]]]:
    """Markdown tables as (heading above them, rows as dicts keyed by column)."""
    out, heading, lines = [], "", md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i]
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            head = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip("|").split(" | ")))))
                i += 1
            out.append((heading, rows))
        i += 1
    return out


def table(md: str, heading_start: str) -> list[dict]:
    return [row for h, rows in tables(md) if h.startswith(heading_start) for row in rows]


def build(tmp_path, paths, **kw) -> tuple[report.Report, str, str]:
    rep = report.build_report(paths, str(tmp_path / "out"), **kw)
    with open(rep.markdown_path, encoding="utf-8") as f, open(rep.html_path, encoding="utf-8") as g:
        return rep, f.read(), g.read()


def test_tables_show_figures_ratios_and_machines(tmp_path):
    rep, md, _ = build(tmp_path, three())
    lat = table(md, "### Latency and throughput")
    ours = next(r for r in lat if r["SKU"] == "Standard_F4s_v2" and r["runtime"] == "gpt2onnx" and r["batch"] == "1")
    assert ours["measured on (CPU)"] == F4S_CPU
    assert (ours["first token p50 ms"], ours["token p50 ms"], ours["token p90 ms"], ours["token p99 ms"],
            ours["tokens/s"], ours["n"]) == ("20.0", "10.0", "12.0", "15.0", "100.0", "1")
    failed = next(r for r in lat if r["SKU"] == "Standard_D4as_v4" and r["runtime"] == "optimum")
    assert failed["token p50 ms"] == "-" and "failed: optimum not installed" in failed["n"]

    sp = {(r["SKU"], r["batch"], r["baseline"]): r for r in table(md, "### Speed-up over baselines")}
    f4 = sp[("Standard_F4s_v2", "1", "pytorch fp32")]
    assert (f4["decode speed-up (p50)"], f4["first-token speed-up (p50)"], f4["tokens/s ratio"]) == (
        "4.00x", "3.00x", "4.00x")
    assert sp[("Standard_F4s_v2", "1", "optimum fp32")]["decode speed-up (p50)"] == "2.50x"
    assert sp[("Standard_F4s_v2", "4", "pytorch fp32")]["decode speed-up (p50)"] == "4.00x"
    assert sp[("Standard_D4as_v4", "1", "pytorch fp32")]["first-token speed-up (p50)"] == "2.50x"
    assert sp[("Standard_E4s_v3", "1", "pytorch fp32")]["decode speed-up (p50)"] == "3.00x"
    assert "baseline failed: optimum not installed" in sp[("Standard_D4as_v4", "1", "optimum fp32")]["n"]
    assert all(r["measured on (CPU)"] for r in sp.values())

    machines = {r["SKU"]: r for r in table(md, "### Machines")}
    assert machines["Standard_D4as_v4"]["CPU model"] == "AMD EPYC 7452 32-Core Processor"
    assert machines["Standard_F4s_v2"]["ISA"] == "avx2 avx512f avx512_vnni"
    # No SLO, no prices: the fastest SKU.
    (rec,) = rep.recommendations
    assert (rec.sku, rec.basis, rec.measured_on) == ("Standard_F4s_v2", "fastest", (F4S_CPU,))
    assert rep.warnings == ()


def test_recommends_cheapest_sku_meeting_slos(tmp_path):
    p = prices(tmp_path, {"Standard_F4s_v2": 0.5, "Standard_D4as_v4": 0.3, "Standard_E4s_v3": 0.1})
    rep, md, _ = build(tmp_path, three(), prices_path=p, slo_first_token_ms=25, slo_token_ms=13)
    (rec,) = rep.recommendations
    # D4as (30 ms first token) misses; E4s (24/12 ms) is cheaper per token than F4s.
    assert (rec.sku, rec.basis, rec.threads, rec.currency) == ("Standard_E4s_v3", "cheapest", 4, "EUR")
    assert rec.cost_per_1m_tokens == pytest.approx(0.1 / (83.3 * 3600) * 1e6)
    assert "cheapest SKU meeting first token p50 <= 25 ms and token p50 <= 13 ms" in rec.note
    row = table(md, "## Recommendations")[0]
    assert row["recommended SKU"] == "Standard_E4s_v3" and row["cost / 1M tokens (EUR)"] == "0.333"
    lat = table(md, "### Latency and throughput")
    f4 = next(r for r in lat if r["SKU"] == "Standard_F4s_v2" and r["runtime"] == "gpt2onnx" and r["batch"] == "1")
    assert f4["cost / 1M tokens (EUR)"] == f"{0.5 / (100 * 3600) * 1e6:.3f}"
    # A tighter token SLO leaves only F4s.
    rep, _, _ = build(tmp_path, three(), prices_path=p, slo_token_ms=11)
    assert rep.recommendations[0].sku == "Standard_F4s_v2"
    # Only the first-token SLO given: 22 ms leaves F4s (20 ms); E4s (24 ms) and D4as (30 ms) miss it.
    rep, _, _ = build(tmp_path, three(), prices_path=p, slo_first_token_ms=22)
    assert rep.recommendations[0].sku == "Standard_F4s_v2"
    rep, _, _ = build(tmp_path, three(), prices_path=p, slo_first_token_ms=24)  # the limit itself passes
    assert rep.recommendations[0].sku == "Standard_E4s_v3"


def test_fastest_without_prices_and_unpriced_fallback(tmp_path):
    rep, _, _ = build(tmp_path, three(), slo_token_ms=13)
    assert (rep.recommendations[0].sku, rep.recommendations[0].basis) == ("Standard_F4s_v2", "fastest")
    p = prices(tmp_path, {"Standard_D4as_v4": 0.3, "Standard_E4s_v3": 0.1})
    rep, _, _ = build(tmp_path, three(), prices_path=p, slo_token_ms=11)
    rec = rep.recommendations[0]
    assert (rec.sku, rec.basis, rec.cost_per_1m_tokens) == ("Standard_F4s_v2", "fastest", None)
    assert "none of the SKUs meeting it has a price" in rec.note


def test_says_clearly_when_no_sku_meets_the_slos(tmp_path):
    rep, md, html = build(tmp_path, three(), slo_token_ms=5)
    (rec,) = rep.recommendations
    assert rec.sku is None and rec.measured_on == ()
    assert rec.note.startswith("NO SKU meets token p50 <= 5 ms; closest: Standard_F4s_v2")
    assert table(md, "## Recommendations")[0]["recommended SKU"] == "NONE"
    assert "NO SKU meets" in html


def test_html_embeds_every_plot(tmp_path):
    rep, _, html = build(tmp_path, three(), prices_path=os.path.join(REPO, "bench", "prices.example.toml"))
    kinds = sorted(os.path.basename(p) for p in rep.plot_paths)
    assert kinds == ["group1_cost.png", "group1_latency.png", "group1_speedup.png", "group1_tokens_per_s.png"]
    assert html.count('src="data:image/png;base64,') == 4
    assert 'src="http' not in html and ".png\"" not in html  # self-contained
    for p in rep.plot_paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rep, _, html = build(tmp_path, three())  # no prices: no cost plot
    assert html.count("data:image/png;base64,") == len(rep.plot_paths) == 3


def test_example_prices_are_labelled(tmp_path):
    rep, md, html = build(tmp_path, three(), prices_path=os.path.join(REPO, "bench", "prices.example.toml"))
    assert "EXAMPLE placeholder prices" in md and "(USD, EXAMPLE prices)" in md
    assert "(EXAMPLE prices)" in rep.recommendations[0].note and "EXAMPLE" in html


def test_random_weights_and_projection_are_labelled_and_kept_apart(tmp_path):
    rnd = fixture("f4s_v2.json")
    rnd["model"]["random_weights"] = True
    proj = fixture("f4s_v2.json")
    proj["projection"], proj["sku"] = True, "Standard_F8s_v2"
    proj["environment"].update(logical_cores=8, physical_cores=4, memory_gib=15.6, affinity=list(range(8)))
    for row in proj["results"]:
        row["token_ms"]["p50"] = 5.0
    paths = [*three(), write(tmp_path, "rnd.json", rnd), write(tmp_path, "proj.json", proj)]
    rep, md, html = build(tmp_path, paths)
    heads = [ln for ln in md.splitlines() if ln.startswith("## Group")]
    assert len(heads) == 3
    assert heads[0].startswith("## Group 1") and "random weights" not in heads[0] and "projection" not in heads[0]
    assert heads[1].endswith(", random weights")
    assert heads[2].endswith(", projection (not measured)")  # measurements first
    sections = md.split("\n## Group ")[1:]
    for section, label in ((sections[1], ", random weights"), (sections[2], ", projection (not measured)")):
        subheads = [ln for ln in section.splitlines() if ln.startswith("### ") or ln.startswith("![")]
        assert len(subheads) >= 6  # machines, latency, speed-up, quality tables + plots
        assert all(label in ln for ln in subheads), subheads
        assert label.lstrip(", ") in html
    assert all("random weights" not in ln and "projection" not in ln for ln in sections[0].splitlines()
               if ln.startswith("### ") or ln.startswith("!["))
    assert "PROJECTION (NOT MEASURED): these figures are estimates" in md
    assert "RANDOM WEIGHTS: the model had random weights" in md
    # The projected F8s (faster) never leaks into measured tables or their recommendation.
    measured = [r for h, rows in tables(md) if h.startswith("### ") and "projection" not in h for r in rows]
    assert measured and all(r.get("SKU") != "Standard_F8s_v2" for r in measured)
    recs = {(r.random_weights, r.projection): r for r in rep.recommendations}
    assert recs[(False, False)].sku == "Standard_F4s_v2"
    assert recs[(False, True)].sku == "Standard_F8s_v2"
    assert "[projection (not measured)]" in recs[(False, True)].note
    assert "[random weights]" in recs[(True, False)].note
    assert any(p.endswith("group3_latency.png") for p in rep.plot_paths)


def test_precisions_and_versions_are_separate_groups(tmp_path):
    fp32 = fixture("f4s_v2.json")
    fp32["model"]["precision"] = "fp32"
    for row in fp32["results"]:
        if row["runtime"] == "gpt2onnx":
            row["precision"], row["token_ms"]["p50"] = "fp32", 20.0
    int4 = fixture("f4s_v2.json")
    int4["model"]["precision"] = "int4"
    for row in int4["results"]:
        if row["runtime"] == "gpt2onnx":
            row["precision"], row["token_ms"]["p50"] = "int4", 4.0
    ort = fixture("e4s_v3.json")
    ort["environment"]["versions"]["onnxruntime"] = "1.19.0"
    paths = [*three(), write(tmp_path, "fp32.json", fp32), write(tmp_path, "int4.json", int4),
             write(tmp_path, "ort.json", ort)]
    rep, md, _ = build(tmp_path, paths)
    heads = [ln for ln in md.splitlines() if ln.startswith("## Group")]
    assert len(heads) == len(rep.recommendations) == 4
    assert sum(" fp32, " in h for h in heads) == 1 and sum(" int8, " in h for h in heads) == 2
    assert sum(" int4, " in h for h in heads) == 1
    int4_rows = [r for h, rows in tables(md) if h.startswith("### Latency") and " int4, " in h for r in rows]
    assert {r["precision"] for r in int4_rows if r["runtime"] == "gpt2onnx"} == {"int4"}
    assert sum("onnxruntime 1.19.0" in h for h in heads) == 1
    fp32_rows = [r for h, rows in tables(md) if h.startswith("### Latency") and " fp32, " in h for r in rows]
    assert {r["precision"] for r in fp32_rows if r["runtime"] == "gpt2onnx"} == {"fp32"}
    assert any(r["token p50 ms"] == "20.0" for r in fp32_rows)
    int8_rows = [r for h, rows in tables(md) if h.startswith("### Latency") and " int8, " in h for r in rows]
    assert all(r["token p50 ms"] != "20.0" or r["runtime"] != "gpt2onnx" for r in int8_rows)


def test_repeated_records_show_median_with_count(tmp_path):
    paths = []
    for i, tok in enumerate((10.0, 15.0, 11.0)):  # median 11, mean 12
        rec = fixture("f4s_v2.json")
        rec["results"][0]["token_ms"]["p50"] = tok
        paths.append(write(tmp_path, f"run{i}.json", rec))
    _, md, _ = build(tmp_path, paths)
    row = next(r for r in table(md, "### Latency") if r["runtime"] == "gpt2onnx" and r["batch"] == "1")
    assert (row["token p50 ms"], row["n"]) == ("11.0", "3")
    sp = next(r for r in table(md, "### Speed-up") if r["baseline"] == "pytorch fp32" and r["batch"] == "1")
    assert (sp["decode speed-up (p50)"], sp["n"]) == ("3.64x", "3")  # median of 40/10, 40/15, 40/11
    assert len(table(md, "### Machines")) == 3  # every record listed


def test_cpu_mismatch_and_missing_sku_warn(tmp_path):
    odd = fixture("d4as_v4.json")
    odd["environment"]["isa"]["avx512f"] = True
    local = fixture("e4s_v3.json")
    local["sku"] = None
    rep, md, _ = build(tmp_path, [write(tmp_path, "odd.json", odd), write(tmp_path, "local.json", local)])
    assert any("odd.json: machine does not match Standard_D4as_v4, so it is never recommended: "
               "avx512f detected" in w for w in rep.warnings)
    assert any("local.json: no SKU recorded" in w for w in rep.warnings)
    assert "## Warnings" in md
    # Neither the SKU-less machine nor the one that is not what its SKU says is recommended.
    (rec,) = rep.recommendations
    assert rec.sku is None and "not counted: records of Standard_D4as_v4 measured on a machine" in rec.note
    machines = {r["file"]: r for r in table(md, "### Machines")}
    assert machines["odd.json"]["SKU"] == "Standard_D4as_v4 (machine does not match)"
    lat = table(md, "### Latency and throughput")
    assert {r["SKU"] for r in lat} == {"Standard_D4as_v4 (machine does not match)", "(no SKU)"}


def test_a_mismatched_record_is_never_recommended_even_when_fastest(tmp_path):
    """A 2-vCPU machine benched as F4s_v2 (what --sku on the wrong VM gives): shown, flagged, not picked."""
    fast = fixture("f4s_v2.json")
    fast["environment"].update(logical_cores=2, physical_cores=1, affinity=[0, 1])
    paths = [write(tmp_path, "f4s_on_2vcpu.json", fast), *three()[1:]]
    rep, md, _ = build(tmp_path, paths)
    (rec,) = rep.recommendations
    assert rec.sku == "Standard_E4s_v3"  # the next fastest, on a machine that is what it says
    assert "not counted: records of Standard_F4s_v2" in rec.note
    (w,) = [w for w in rep.warnings if "f4s_on_2vcpu.json" in w]
    assert "2 vCPUs detected, catalog says 4" in w and "pinned" not in w
    row = table(md, "## Recommendations")[0]
    assert row["recommended SKU"] == "Standard_E4s_v3" and "Standard_F4s_v2" in row["why"]


def test_a_ds3_v2_record_on_4_cores_matches_and_is_recommended(tmp_path):
    """DSv2 has one vCPU per core: a real Standard_DS3_v2 (4 vCPUs, 4 physical cores) is no mismatch."""
    ds3 = fixture("f4s_v2.json")
    ds3["sku"] = "Standard_DS3_v2"
    ds3["environment"].update(logical_cores=4, physical_cores=4, memory_gib=13.7)
    rep, md, _ = build(tmp_path, [write(tmp_path, "ds3_v2.json", ds3), *three()[1:]])
    assert not [w for w in rep.warnings if "ds3_v2.json" in w]
    (rec,) = rep.recommendations
    assert rec.sku == "Standard_DS3_v2"  # the fastest, and what it says it is
    assert {r["file"]: r["SKU"] for r in table(md, "### Machines")}["ds3_v2.json"] == "Standard_DS3_v2"


def test_the_why_column_names_the_deciding_figure_over_three_skus(tmp_path):
    rep, md, _ = build(tmp_path, three())  # no SLO, no prices: the fastest token p50
    why = table(md, "## Recommendations")[0]["why"]
    assert why.startswith("Standard_F4s_v2 (4 threads) is the fastest SKU meeting no latency SLO")
    assert "decided by token p50: 10.0 ms vs 12.0 ms for Standard_E4s_v3 (4 threads)" in why
    p = prices(tmp_path, {"Standard_F4s_v2": 0.5, "Standard_D4as_v4": 0.3, "Standard_E4s_v3": 0.1})
    rep, md, _ = build(tmp_path, three(), prices_path=p, slo_token_ms=13)
    why = table(md, "## Recommendations")[0]["why"]
    assert why.startswith("Standard_E4s_v3 (4 threads) is the cheapest SKU meeting token p50 <= 13 ms")
    assert "decided by cost per 1M tokens: 0.333 EUR vs " in why
    rep, md, _ = build(tmp_path, three(), prices_path=p, slo_token_ms=11)
    assert "the only one meeting it" in table(md, "## Recommendations")[0]["why"]


def test_rebuilding_replaces_the_report(tmp_path):
    first, _, _ = build(tmp_path, three())
    second, md, _ = build(tmp_path, three()[:1])
    assert first.markdown_path == second.markdown_path and "Standard_D4as_v4" not in md
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp")]


def test_the_report_folder_is_rewritten_whole(tmp_path):
    with_cost, _, _ = build(tmp_path, three(), prices_path=os.path.join(REPO, "bench", "prices.example.toml"))
    assert os.path.exists(tmp_path / "out" / "group1_cost.png")
    without, _, _ = build(tmp_path, three())  # no prices: no cost plot, and none left from before
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["report.md", "report.html", *(os.path.basename(p) for p in without.plot_paths)])
    assert "group1_cost.png" not in os.listdir(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a report")
    with pytest.raises(InvalidRequestError, match="holds files that are not a gpt2onnx report .notes.txt."):
        report.build_report(three(), str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a report"


# --- bad inputs -------------------------------------------------------------------------

def test_empty_list_and_bad_slo(tmp_path):
    for paths in ([], (), "one.json"):
        with pytest.raises(InvalidRequestError, match="no bench records given"):
            report.build_report(paths, str(tmp_path / "out"))
    with pytest.raises(InvalidRequestError, match="slo_token_ms must be a positive number"):
        report.build_report(three(), str(tmp_path / "out"), slo_token_ms=-1)
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_records_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ArtifactError, match=f"^{missing}: cannot read bench record"):
        report.build_report([*three(), missing], str(tmp_path / "out"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "gpt2onnx.bench/1", ')
    with pytest.raises(ArtifactError, match="corrupt.json: not valid JSON"):
        report.build_report([*three(), str(corrupt)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("schema, match", [
    ("gpt2onnx.bench/7", "newer than this gpt2onnx .*upgrade gpt2onnx"),
    ("gpt2onnx.bench/0", "older than this gpt2onnx .*re-run the benchmark"),
])
def test_schema_version_mismatch(tmp_path, schema, match):
    rec = fixture("f4s_v2.json")
    rec["schema"] = schema
    path = tmp_path / "other.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(ArtifactError, match=f"other.json: schema {schema} is {match}"):
        report.build_report([str(path)], str(tmp_path / "out"))


@pytest.mark.parametrize("text, match", [
    ("currency = ", "not valid TOML"),
    ('[price_per_hour]\nStandard_F4s_v2 = 0.2\n', "need a `currency` string"),
    ('currency = "USD"\n', r"need a non-empty \[price_per_hour\] table"),
    ('currency = "USD"\n[price_per_hour]\nStandard_F4s_v2 = -1\n', "price of Standard_F4s_v2 must be a positive"),
    ('currency = "USD"\n[price_per_hour]\nStandard_F4s_v2 = "cheap"\n', "must be a positive number"),
    ('currency = "USD"\nexample = "yes"\n[price_per_hour]\nStandard_F4s_v2 = 1\n', "`example` must be true or false"),
    ('currency = "USD"\nprice = 1\n[price_per_hour]\nStandard_F4s_v2 = 1\n', "unknown key"),
])
def test_bad_prices_file(tmp_path, text, match):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match=match) as e:
        report.build_report(three(), str(tmp_path / "out"), prices_path=str(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    with pytest.raises(InvalidRequestError, match="cannot read prices"):
        report.build_report(three(), str(tmp_path / "out"), prices_path=str(tmp_path / "nope.toml"))
    assert not (tmp_path / "out").exists()


def test_unknown_sku_in_prices_is_a_warning(tmp_path):
    p = prices(tmp_path, {"Standard_F4s_v2": 0.5, "Standard_F4s_v9": 0.1})
    rep, _, _ = build(tmp_path, three(), prices_path=p)
    assert any("Standard_F4s_v9 is not in the SKU catalog" in w for w in rep.warnings)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(Gpt2OnnxError, match=r"pip install 'gpt2onnx\[report\]'"):
        report.build_report(three(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_an_int8_kv_cache_is_its_own_group(tmp_path):
    """int8 weights with an fp32 and with an int8 KV cache are different models: never one median."""
    kv8 = fixture("f4s_v2.json")
    kv8["model"]["kv_cache"] = "int8"
    for row in kv8["results"]:
        if row["runtime"] == "gpt2onnx":
            row["token_ms"]["p50"] = 3.0
    fp32_kv = fixture("f4s_v2.json")
    fp32_kv["model"]["kv_cache"] = "fp32"  # the same as a record without the field
    rep, md, _ = build(tmp_path, [write(tmp_path, "kv8.json", kv8), write(tmp_path, "kvfp32.json", fp32_kv),
                                  *three()])
    heads = [ln for ln in md.splitlines() if ln.startswith("## Group")]
    assert sum(" int8 + int8 KV, " in h for h in heads) == 1 and sum(" int8, " in h for h in heads) == 1
    kv8_rows = [r for h, rows in tables(md) if h.startswith("### Latency") and "int8 KV" in h for r in rows]
    assert any(r["token p50 ms"] == "3.0" for r in kv8_rows)
    bad = fixture("f4s_v2.json")
    bad["model"]["kv_cache"] = "fp16"
    with pytest.raises(Exception, match="model.kv_cache is 'fp16', expected one of fp32, int8"):
        results.validate(bad, source="bad.json")
