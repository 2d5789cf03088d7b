"""Outlier-channel variants of a small GPT-2, for testing the int8/int4 recipes.

Trained GPT-2 has a few activation channels hundreds of times larger than the rest; a
random or small trained model has none. `inject_outliers` gives a PyTorch GPT-2 such
channels without changing its fp32 function, so the quantization recipes and their
fidelity gate can be tested on the failure they guard against (docs/quality.md).

For example (export/ is on pytest's path, pyproject.toml)::

    from outliers import inject_outliers
    inject_outliers(model, channels=(3, 17), scale=300.0)   # -> (3, 17)
"""

from __future__ import annotations


def inject_outliers(model, *, channels=(3, 17), scale: float = 300.0, mode: str = "scale") -> tuple[int, ...]:
    """Give a PyTorch GPT-2 outlier activation channels like trained GPT-2's, same fp32 function.

    In every layer, the `channels` of the ln_1 and ln_2 outputs (the inputs of
    ``attn.c_attn`` and ``mlp.c_fc``) become about `scale` times larger than the rest:

    - ``mode="scale"``: multiply those channels' LayerNorm weight and bias by `scale`
      and divide the matching input rows of the next weight (Conv1D layout (in, out))
      by it. The divided rows are then `scale` times smaller than their neighbours in
      each quantization block, which real GPT-2 does not have; this is pessimistic
      for *weight* quantization too.
    - ``mode="shift"``: add `scale` (alternating sign) to those channels' LayerNorm
      bias and subtract ``scale * row`` from the next layer's bias. The weights are
      untouched; the outlier is a near-constant "massive activation", as measured in
      trained LLMs (Sun et al., 2024, "Massive activations in large language models").

    ::

        x ─LayerNorm─> y (channels ~scale× larger) ── y @ W' + b' ──> same output as before

    Modifies `model` in place (fp32 logits change only by rounding); returns the channels.
    """
    import torch

    if mode not in ("scale", "shift"):
        raise ValueError(f"mode must be 'scale' or 'shift', got {mode!r}")
    channels = tuple(int(c) for c in channels)
    idx = torch.tensor(channels)
    sign = torch.tensor([(-1.0) ** i for i in range(len(channels))])
    with torch.no_grad():
        for block in model.transformer.h:
            for ln, nxt in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                if mode == "scale":
                    ln.weight[idx] *= scale
                    ln.bias[idx] *= scale
                    nxt.weight[idx, :] /= scale
                else:
                    shift = (scale * sign).to(ln.bias.dtype)  # (C,)
                    ln.bias[idx] += shift
                    nxt.bias -= (shift[:, None].double() * nxt.weight[idx, :].double()).sum(0).to(nxt.bias.dtype)
    return channels
