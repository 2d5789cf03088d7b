"""Export GPT-2 to a verified ONNX model folder (fp32, int8 or int4) with a KV cache.

For example::

    import gpt2onnx
    gpt2onnx.export("gpt2", "out/gpt2-int8", precision="int8", random_weights=True)

Steps: load (torch) -> build the graph -> record the PyTorch reference -> check fp32
parity (a failure raises `ParityError`) -> quantize (int8/int4) and gate it -> write the
tokenizer, config, manifest and model card. Everything is written into a temporary
folder beside OUTDIR and renamed into place at the end, so a failure or Ctrl-C leaves
no half-written folder.
"""

from __future__ import annotations

import datetime
import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from .._version import package_versions
from ..artifact import Manifest
from ..errors import ExportError, Gpt2OnnxError, ModelDownloadError, ParityError, UnsupportedModelError
from ..progress import Progress

PRECISIONS = ("fp32", "int8", "int4")
QUANTIZED = ("int8", "int4")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how."""

    source: str  # hub id or local save_pretrained folder
    outdir: str  # the model folder to create
    precision: str = "fp32"  # "fp32", "int8" or "int4"
    force: bool = False  # replace an existing outdir
    random_weights: bool = False  # seeded random weights instead of loading them
    random_weights_fallback: bool = False  # random weights, with a notice, when a hub id cannot be downloaded
    seed: int = 0  # seed of the random weights
    tokenizer: str | None = None  # folder with tokenizer.json or vocab.json + merges.txt
    progress: bool = True  # show progress on stderr
    accept_fidelity_miss: bool = False  # finish an int8/int4 export that misses its gate (recorded as such)
    kv_cache: str = "auto"  # "auto", "fp32" or "int8" (static per-channel scales; gated like a quantized precision)

    @property
    def kv_wanted(self) -> str:
        """The cache tried first: "auto" is int8 for quantized weights, fp32 for fp32 weights."""
        if self.kv_cache == "auto":
            return "int8" if self.precision in QUANTIZED else "fp32"
        return self.kv_cache

    def __post_init__(self):
        from .kvcache import KV_CACHES

        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kv_cache not in KV_CACHES:
            raise ExportError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}; "
                              "pass --kv-cache auto, fp32 or int8")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ExportError(f"seed must be a non-negative integer, got {self.seed!r}")


def _tokenizer(cfg: ExportConfig, src, vocab_size: int):
    from .. import tokenizer as tok

    if cfg.tokenizer:
        if not os.path.isdir(cfg.tokenizer):
            raise UnsupportedModelError(f"tokenizer folder {cfg.tokenizer!r} does not exist; "
                                        "pass a folder with vocab.json + merges.txt or tokenizer.json")
        t = tok.from_files(cfg.tokenizer)
    elif src.folder:
        t = tok.from_files(src.folder)
    elif src.kind == "random":
        t = tok.packaged()  # the real GPT-2 vocabulary, shipped with gpt2onnx
    else:
        from transformers import AutoTokenizer

        try:
            t = AutoTokenizer.from_pretrained(src.id).backend_tokenizer
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(f"could not load the tokenizer of {src.id!r} ({str(e)[:100]}); "
                                        "pass --tokenizer DIR") from None
    if t.get_vocab_size() > vocab_size:
        raise UnsupportedModelError(
            f"the tokenizer has {t.get_vocab_size()} tokens but the model only {vocab_size}; "
            "pass the model's own tokenizer with --tokenizer DIR"
        )
    return t


def _opset(path: str) -> int:
    """The default-domain opset of the written graph (17; 21 for the qgemm scheme, see exporter/qgemm.py)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx"))


def _versions() -> dict:
    return package_versions(("onnxruntime", "onnx", "torch", "transformers", "numpy"))


def export(source: str, outdir: str, *, precision: str = "fp32", force: bool = False,
           random_weights: bool = False, seed: int = 0, tokenizer: str | None = None,
           progress: bool = True, accept_fidelity_miss: bool = False, kv_cache: str = "auto",
           random_weights_fallback: bool = False) -> Manifest:
    """Export a GPT-2 to an ONNX model folder and verify it against PyTorch.

    Args:
        source: a hub id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``,
            ``distilgpt2``; ``openai-community/`` prefix optional) or a local folder
            written by ``save_pretrained``.
        outdir: the model folder to create (refused if it exists, unless `force`).
        precision: ``"fp32"``, ``"int8"`` or ``"int4"`` (4-bit MatMuls, 8-bit token table).
        force: replace an existing `outdir`.
        random_weights: build the architecture with seeded random weights (benchmarks
            where the weights are unavailable; the folder says so everywhere).
        seed: seed of the random weights.
        tokenizer: folder with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
            (default: the source's own, or GPT-2's shipped one for random weights).
        progress: show the steps on stderr.
        accept_fidelity_miss: finish an int8/int4 export that misses its fidelity gate;
            the manifest and model card then say "gate missed, accepted".
        random_weights_fallback: where the weights of a hub id cannot be downloaded, print
            a notice and export its architecture with `seed`'s random weights (what the
            quickstart does); the export runs once, its steps counted once.
        kv_cache: ``"auto"`` (default), ``"fp32"`` or ``"int8"``: the KV cache in int8 with
            per-channel scales calibrated on real text (a quarter of the bytes; faster batched
            decode), gated against fp32 like a quantized precision. ``"auto"``: int8 for int8 and
            int4 weights if it passes their gate, else fp32 (the progress says so); fp32 for fp32. Its past/present are int8 tensors: Optimum runs the folder
            as it is; a consumer that makes its own float32 past must make it int8.

    Returns:
        The manifest written to ``outdir/gpt2onnx.json``, typed as `load` reads it
        (`gpt2onnx.artifact.Manifest`; ``.to_dict()`` gives the JSON).

    Raises:
        UnsupportedModelError: the source is missing or not GPT-2.
        ExportError: the output cannot be written.
        ParityError: the fp32 graph does not reproduce PyTorch within 1e-3.
        FidelityError: the int8/int4 (or int8-KV) graph misses its gate of
            `gpt2onnx.exporter.policy` on real text (unless `accept_fidelity_miss`).

    For example::

        m = export("gpt2", "out/gpt2", random_weights=True)
        m.parity["fp32_max_abs_diff"] < 1e-3
        # -> True
    """
    cfg = ExportConfig(source=os.fspath(source), outdir=os.fspath(outdir), precision=precision, force=force,
                       random_weights=random_weights, seed=seed, tokenizer=tokenizer, progress=progress,
                       accept_fidelity_miss=accept_fidelity_miss, kv_cache=kv_cache,
                       random_weights_fallback=random_weights_fallback)
    from ..fsutil import remove_own_temps, remove_stale_temps, temp_prefix
    from .publish import check_outdir, publish

    remove_stale_temps(cfg.outdir)  # folders of killed exports; moves a parked old folder back
    out = check_outdir(cfg)
    parent = os.path.dirname(out)
    bar = Progress("gpt2onnx export", total=_steps(cfg), unit="steps", enabled=progress,
                   bar_format="gpt2onnx export: {desc} (step {n_fmt}/{total_fmt}) {elapsed}")  # before mkdtemp
    ok = False
    try:
        tmp = tempfile.mkdtemp(prefix=temp_prefix(out), dir=parent)
        manifest = _export_into(cfg, tmp, bar)
        publish(tmp, out)
        ok = True
        return manifest
    except BaseException as e:
        remove_own_temps(out)  # by name (host + pid): also right when Ctrl-C lands inside mkdtemp
        if isinstance(e, OSError) and not isinstance(e, Gpt2OnnxError):
            raise ExportError(f"writing the export failed ({e.strerror or e}); check free disk space and "
                              "permissions of the output path") from e
        raise
    finally:
        bar.close("done" if ok else None)


def _steps(cfg: ExportConfig) -> int:
    """Progress steps: 6, + quantize and gate for int8/int4 weights, + calibrate (and gate) an int8 KV cache."""
    quantized = cfg.precision in QUANTIZED
    return 6 + 2 * quantized + (0 if cfg.kv_wanted == "fp32" else 1 if quantized else 2)


def _export_into(cfg: ExportConfig, tmp: str, bar: Progress) -> Manifest:
    from .. import artifact
    from .. import sources
    from ..eval import gate
    from . import graph, hfcompat, kvcache, modelcard, parity, policy
    from .quantize import calibrate, outlier_channels, recipes_to_try

    t0 = time.perf_counter()
    bar.step("load model")
    try:
        src = sources.load(cfg.source, random_weights=cfg.random_weights, seed=cfg.seed)
    except ModelDownloadError as e:
        if not cfg.random_weights_fallback:
            raise
        bar.write(f"gpt2onnx: notice: the weights of {cfg.source!r} cannot be downloaded here "
                  f"({str(e).split(';')[0]}); exporting its architecture with RANDOM WEIGHTS (seed {cfg.seed}) "
                  "instead: the text will be meaningless, the speed is real")
        src = sources.load(cfg.source, random_weights=True, seed=cfg.seed)
    dims = graph.Dims.from_config(src.config)
    tok = _tokenizer(cfg, src, dims.vocab_size)
    n_params = sum(p.numel() for p in src.model.parameters())

    bar.step("build ONNX graph")
    quantized = cfg.precision in QUANTIZED
    gated = quantized or cfg.kv_wanted != "fp32"  # the fp32 graph is then a reference, in its own folder
    fp32_dir = os.path.join(tmp, "fp32") if gated else tmp
    os.makedirs(fp32_dir, exist_ok=True)
    fp32_path = graph.build(sources.numpy_weights(src.model), dims, fp32_dir,
                            untied_lm_head=quantized)

    bar.step("record PyTorch reference")
    steps = parity.reference(src.model)
    window = min(dims.n_positions, 1024)
    gate_ids = tok.encode(gate.gate_text()).ids if gated else None
    outliers = None
    if quantized:  # which MatMul inputs have outlier channels (see quantize.py)
        first = recipes_to_try(n_embd=dims.n_embd, precision=cfg.precision)[0]  # its outlier_ratio and cap
        outliers = outlier_channels(calibrate(src.model, gate_ids[:gate.CALIBRATION_TOKENS], window=window), first)
    config_json = src.config.to_dict()
    eos = src.config.eos_token_id if src.config.eos_token_id is not None else tok.token_to_id("<|endoftext|>")
    bos = src.config.bos_token_id if src.config.bos_token_id is not None else eos
    source_info = {"id": cfg.source, "kind": src.kind, "revision": src.revision,
                   "random_weights": src.random_weights, "seed": src.seed}
    name = src.name
    del src
    gc.collect()

    bar.step("verify fp32 parity")
    session = policy.cpu_session(fp32_path)
    fp32 = parity.compare(steps, parity.run_onnx(session, steps))
    if fp32["max_abs_diff"] > parity.FP32_TOLERANCE:
        raise ParityError(
            f"the fp32 graph differs from PyTorch by {fp32['max_abs_diff']:.3g} (> {parity.FP32_TOLERANCE}); "
            "this is a gpt2onnx bug for this model, please report it with the model's config.json"
        )
    fresh = [s for s in steps if s.fresh]
    par = {"fp32_max_abs_diff": fp32["max_abs_diff"], "fp32_top1_agreement": fp32["top1_agreement"],
           "prompts": int(fresh[0].feeds["input_ids"].shape[0]), "decode_steps": len(steps) // len(fresh) - 1,
           "positions": fp32["positions"], "paddings": ", ".join(s.padding for s in fresh),
           "fp32_max_abs_diff_by_padding": fp32["max_abs_diff_by_padding"]}
    kv_scales, kv = None, kvcache.kv_record("fp32")
    if cfg.kv_wanted == "int8":  # scales from the fp32 graph's own keys and values on text the gate does not score
        bar.step("calibrate the int8 KV cache")
        begin, end = gate.kv_calibration_slice(len(gate_ids), window)
        kv_scales = kvcache.scales(kvcache.calibrate(session, gate_ids[begin:end], window=window,
                                                     n_layer=dims.n_layer))
        kv = kvcache.kv_record("int8", calibration={"text": "gpt2onnx/data/gate_text.txt", "tokens": [begin, end],
                                                    "window": window})
    del session
    quant = fid = None
    if gated:
        quant, par_q, fid = policy.quantize_gated(cfg, tmp, fp32_path, steps, dims, outliers, gate_ids, window,
                                                  source_info["random_weights"], bar, kv_scales,
                                                  kv_fallback=cfg.kv_cache == "auto")
        if fid["kv_cache"] == "fp32":  # "auto" fell back: the int8 cache missed the gate
            kv = kvcache.kv_record("fp32")
        par[cfg.precision if quantized else "fp32_kv_int8"] = par_q  # the manifest's kv_cache says which cache
        if not quantized:  # fp32 weights, int8 cache: the gated graph shares the fp32 graph's weights file
            os.replace(os.path.join(fp32_dir, graph.EXTERNAL_DATA), os.path.join(tmp, graph.EXTERNAL_DATA))
            os.replace(policy.gated_path(tmp, fp32_path, cfg.precision), os.path.join(tmp, "model.onnx"))
        shutil.rmtree(fp32_dir)

    bar.step("write tokenizer, config, manifest")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    hfcompat.write(tmp, config_json, tok, eos=eos, bos=bos)  # config.json and what Optimum / AutoTokenizer read
    manifest = {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_info,
        "precision": cfg.precision,
        "quantization": quant,
        "kv_cache": kv,
        "dims": dims.to_json(),
        "n_params": int(n_params),
        "eos_token_id": int(eos),
        "bos_token_id": int(bos),
        "io": graph.io_names(dims.n_layer),
        "opset": _opset(os.path.join(tmp, "model.onnx")),
        "parity": par,
        "fidelity": fid,
        "tools": _versions(),
        "export_seconds": None,
    }
    manifest["tags"] = modelcard.tags(manifest)
    manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
    bar.step("write model card and hashes")
    # The card lists file sizes, so write a provisional manifest first to size the files.
    artifact.write_manifest(tmp, manifest)
    manifest = artifact.read_manifest(tmp).to_dict()
    with open(os.path.join(tmp, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(modelcard.render(manifest))
    artifact.write_manifest(tmp, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return artifact.read_manifest(tmp)
