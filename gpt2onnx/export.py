"""Export GPT-2 to a verified ONNX model folder (fp32 or int8) with a KV cache.

>>> import gpt2onnx
>>> gpt2onnx.export("gpt2", "out/gpt2-int8", precision="int8", random_weights=True)  # doctest: +SKIP

Steps: load (torch) -> build the graph -> record the PyTorch reference -> check fp32
parity (a failure raises `ParityError`) -> quantize (int8) and measure it -> write the
tokenizer, config, manifest and model card. Everything is written into a temporary
folder beside OUTDIR and renamed into place at the end, so a failure or Ctrl-C leaves
no half-written folder.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from . import __version__
from .errors import ExportError, Gpt2OnnxError, ParityError, UnsupportedModelError

PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how."""

    source: str  # hub id or local save_pretrained folder
    outdir: str  # the model folder to create
    precision: str = "fp32"  # "fp32" or "int8"
    force: bool = False  # replace an existing outdir
    random_weights: bool = False  # seeded random weights instead of loading them
    seed: int = 0  # seed of the random weights
    tokenizer: str | None = None  # folder with tokenizer.json or vocab.json + merges.txt
    progress: bool = True  # show progress on stderr
    accept_fidelity_miss: bool = False  # finish an int8 export that misses the gate (recorded as such)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ExportError(f"seed must be a non-negative integer, got {self.seed!r}")


class _Progress:
    """The long steps on stderr: 'gpt2onnx export: quantize int8 (step 5/7) 00:42' (tqdm)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, file=sys.stderr, leave=True,
                        bar_format="gpt2onnx export: {desc} (step {n_fmt}/{total_fmt}) {elapsed}")

    def step(self, desc: str) -> None:
        """Start step `desc` (the previous one is done)."""
        self.bar.set_description_str(desc, refresh=False)
        self.bar.update(1)

    def note(self, desc: str) -> None:
        """Change the current step's description (no new step)."""
        self.bar.set_description_str(desc, refresh=True)

    def close(self, ok: bool) -> None:
        if ok:
            self.bar.set_description_str("done", refresh=False)
        self.bar.refresh()
        self.bar.close()


def _check_outdir(cfg: ExportConfig) -> str:
    out = os.path.abspath(cfg.outdir)
    if os.path.exists(out):
        if not cfg.force:
            raise ExportError(f"output folder {cfg.outdir!r} exists; pass --force to replace it")
        if not os.path.isdir(out):
            raise ExportError(f"output path {cfg.outdir!r} exists and is not a folder; choose another path")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {parent!r} ({e.strerror}); choose a writable output path") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write in {parent!r}; choose a writable output path")
    return out


def _tokenizer(cfg: ExportConfig, src, vocab_size: int):
    from . import tokenizer as tok

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


def _versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"gpt2onnx": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__}


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def export(source: str, outdir: str, *, precision: str = "fp32", force: bool = False,
           random_weights: bool = False, seed: int = 0, tokenizer: str | None = None,
           progress: bool = True, accept_fidelity_miss: bool = False) -> dict:
    """Export a GPT-2 to an ONNX model folder and verify it against PyTorch.

    Args:
        source: a hub id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``,
            ``distilgpt2``; ``openai-community/`` prefix optional) or a local folder
            written by ``save_pretrained``.
        outdir: the model folder to create (refused if it exists, unless `force`).
        precision: ``"fp32"`` or ``"int8"``.
        force: replace an existing `outdir`.
        random_weights: build the architecture with seeded random weights (benchmarks
            where the weights are unavailable; the folder says so everywhere).
        seed: seed of the random weights.
        tokenizer: folder with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
            (default: the source's own, or GPT-2's shipped one for random weights).
        progress: show the steps on stderr.
        accept_fidelity_miss: finish an int8 export that misses the fidelity gate;
            the manifest and model card then say "gate missed, accepted".

    Returns:
        The manifest written to ``outdir/gpt2onnx.json``.

    Raises:
        UnsupportedModelError: the source is missing or not GPT-2.
        ExportError: the output cannot be written.
        ParityError: the fp32 graph does not reproduce PyTorch within 1e-3.
        FidelityError: the int8 graph misses the gate of `gpt2onnx.fidelity` on real
            text (unless `accept_fidelity_miss`).

    >>> m = export("gpt2", "out/gpt2", random_weights=True)   # doctest: +SKIP
    >>> m["parity"]["fp32_max_abs_diff"] < 1e-3                # doctest: +SKIP
    True
    """
    cfg = ExportConfig(source=os.fspath(source), outdir=os.fspath(outdir), precision=precision, force=force,
                       random_weights=random_weights, seed=seed, tokenizer=tokenizer, progress=progress,
                       accept_fidelity_miss=accept_fidelity_miss)
    from .artifact import remove_own_temps, remove_stale_temps, temp_prefix

    remove_stale_temps(cfg.outdir)  # folders of killed exports; moves a parked old folder back
    out = _check_outdir(cfg)
    parent = os.path.dirname(out)
    bar = _Progress(8 if precision == "int8" else 6, progress)  # before mkdtemp: a Ctrl-C here leaves nothing
    ok = False
    try:
        tmp = tempfile.mkdtemp(prefix=temp_prefix(out), dir=parent)
        manifest = _export_into(cfg, tmp, bar)
        _publish(tmp, out)
        ok = True
        return manifest
    except BaseException as e:
        remove_own_temps(out)  # by name (host + pid): also right when Ctrl-C lands inside mkdtemp
        if isinstance(e, OSError) and not isinstance(e, Gpt2OnnxError):
            raise ExportError(f"writing the export failed ({e.strerror or e}); check free disk space and "
                              "permissions of the output path") from e
        raise
    finally:
        bar.close(ok)


def _publish(tmp: str, out: str) -> None:
    """Move the finished folder into place; an old one is removed only after."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the usual permissions
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.exists(out):
        from .artifact import temp_prefix

        old = tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "x"))
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _quantize(cfg: ExportConfig, tmp: str, fp32_path: str, steps, dims, outliers: dict, gate_ids, window: int,
              random_weights: bool, bar: _Progress) -> tuple[dict, dict, dict]:
    """Quantize, then gate on real text; a miss retries with the finer fallback recipe.

    Returns the quantization record, the int8 parity figures and the fidelity record;
    raises FidelityError when the last recipe misses too (unless accepted).
    """
    from . import fidelity, parity
    from .errors import FidelityError
    from .quantize import INT8, quantize_int8, recipes_to_try

    ref = None  # made after the first quantization: the quantizer and an fp32 session at once would double the peak
    stride = window // 2
    tried = []
    for i, recipe in enumerate(recipes_to_try(INT8, dims.n_embd)):
        if i == 0:
            bar.step("quantize int8")
        else:
            bar.note(f"quantize int8 again with block {recipe.block_size} (block {tried[-1]['block_size']} "
                     "missed the fidelity gate)")
        session = _session(quantize_int8(fp32_path, tmp, recipe, outliers))
        if ref is None:
            ref = _session(fp32_path)
        if i == 0:
            bar.step("int8 fidelity gate on real text")
        figures = fidelity.measure(ref, session, gate_ids, window=window, stride=stride, limit=fidelity.GATE_WINDOWS)
        gate, why = fidelity.gate_for(figures, dims.vocab_size, random_weights)
        missed = fidelity.check(figures, gate)
        tried.append({"block_size": recipe.block_size, "top1_agreement": figures["top1_agreement"],
                      "mean_kl": figures["mean_kl"], "missed": missed})
        if not missed:
            break
    if missed and not cfg.accept_fidelity_miss:
        raise FidelityError(f"the int8 graph misses the fidelity gate on real text ({'; '.join(missed)}); "
                            "export fp32 instead, or pass --accept-fidelity-miss to keep it (recorded in the manifest)")
    q = parity.compare(steps, parity.run_onnx(session, steps, dims))
    par = {"max_abs_diff": q["max_abs_diff"], "top1_agreement": q["top1_agreement"],
           "mean_kl": q["mean_kl"], "max_kl": q["max_kl"]}
    quant = dict(recipe.to_json(), outlier_channels={k: v for k, v in sorted(outliers.items())}, tried=tried)
    fid = dict(figures, text="gpt2onnx/data/gate_text.txt (WikiText-2 test tail)", window=window, stride=stride,
               gate=gate, gated=why, missed=missed,
               status="missed, accepted with --accept-fidelity-miss" if missed else "passed")
    return quant, par, fid


def _export_into(cfg: ExportConfig, tmp: str, bar: _Progress) -> dict:
    from . import artifact, fidelity, graph, modelcard, parity, sources
    from .quantize import INT8, calibrate, outlier_channels

    t0 = time.perf_counter()
    bar.step("load model")
    src = sources.load(cfg.source, random_weights=cfg.random_weights, seed=cfg.seed)
    dims = graph.Dims.from_config(src.config)
    tok = _tokenizer(cfg, src, dims.vocab_size)
    n_params = sum(p.numel() for p in src.model.parameters())

    bar.step("build ONNX graph")
    fp32_dir = os.path.join(tmp, "fp32") if cfg.precision == "int8" else tmp
    os.makedirs(fp32_dir, exist_ok=True)
    fp32_path = graph.build(sources.numpy_weights(src.model), dims, fp32_dir,
                            untied_lm_head=cfg.precision == "int8")

    bar.step("record PyTorch reference")
    steps = parity.reference(src.model)
    window = min(dims.n_positions, 1024)
    gate_ids = outliers = None
    if cfg.precision == "int8":  # which MatMul inputs have outlier channels (see quantize.py)
        gate_ids = tok.encode(fidelity.gate_text()).ids
        outliers = outlier_channels(calibrate(src.model, gate_ids[:fidelity.CALIBRATION_TOKENS], window=window), INT8)
    config_json = src.config.to_dict()
    eos = src.config.eos_token_id if src.config.eos_token_id is not None else tok.token_to_id("<|endoftext|>")
    bos = src.config.bos_token_id if src.config.bos_token_id is not None else eos
    source_info = {"id": cfg.source, "kind": src.kind, "revision": src.revision,
                   "random_weights": src.random_weights, "seed": src.seed}
    name = src.name
    del src
    gc.collect()

    bar.step("verify fp32 parity")
    fp32 = parity.compare(steps, parity.run_onnx(_session(fp32_path), steps, dims))
    if fp32["max_abs_diff"] > parity.FP32_TOLERANCE:
        raise ParityError(
            f"the fp32 graph differs from PyTorch by {fp32['max_abs_diff']:.3g} (> {parity.FP32_TOLERANCE}); "
            "this is a gpt2onnx bug for this model, please report it with the model's config.json"
        )
    par = {"fp32_max_abs_diff": fp32["max_abs_diff"], "fp32_top1_agreement": fp32["top1_agreement"],
           "prompts": int(steps[0].feeds["input_ids"].shape[0]), "decode_steps": len(steps) - 1,
           "positions": fp32["positions"]}
    quant = fid = None
    if cfg.precision == "int8":
        quant, par["int8"], fid = _quantize(cfg, tmp, fp32_path, steps, dims, outliers, gate_ids, window,
                                            source_info["random_weights"], bar)
        shutil.rmtree(fp32_dir)

    bar.step("write tokenizer, config, manifest")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=2, default=str)
    manifest = {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_info,
        "precision": cfg.precision,
        "quantization": quant,
        "dims": dims.to_json(),
        "n_params": int(n_params),
        "eos_token_id": int(eos),
        "bos_token_id": int(bos),
        "io": graph.io_names(dims.n_layer),
        "opset": graph.OPSET,
        "parity": par,
        "fidelity": fid if cfg.precision == "int8" else None,
        "tools": _versions(),
        "export_seconds": None,
    }
    manifest["tags"] = modelcard.tags(manifest)
    manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
    bar.step("write model card and hashes")
    # The card lists file sizes, so write a provisional manifest first to size the files.
    artifact.write_manifest(tmp, manifest)
    manifest = artifact.read_manifest(tmp)
    with open(os.path.join(tmp, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(modelcard.render(manifest))
    artifact.write_manifest(tmp, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    return artifact.read_manifest(tmp)
