"""The isolated candidates scored for each layer inside the FP pass: naive, the other activation sign,
and SmoothQuant per alpha (channel granularity; im2col for research)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from sensitivity.capture.observe import LayerObserver
from sensitivity.capture.passes import Candidate
from sensitivity.im2col import Im2colCandidate, im2col_refusal
from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.spec import QuantSpec
from sensitivity.smoothquant import SmoothCandidate

__all__ = ["alt_sign_candidate", "build_candidates", "sq_key"]


def sq_key(granularity: str, alpha: float) -> str:
    """Candidate name, e.g. `sq_channel_0.5` / `sq_im2col_0.75`."""
    return f"sq_{granularity}_{alpha:g}"


def alt_sign_candidate(qmod: QuantMixin, obs: LayerObserver, spec: QuantSpec) -> tuple[str, Candidate]:
    """The same layer with the other activation sign: what unsigned codes would gain (or cost)."""
    unsigned = not qmod.input_quantizer.unsigned
    alt = TensorQuantizer(spec.a_bits, axis=None, unsigned=unsigned)
    alt.set_amax(obs.amax(unsigned=unsigned))

    def run(args: tuple) -> Any:
        saved = qmod.input_quantizer
        qmod.input_quantizer = alt
        try:
            return qmod(*args)  # type: ignore[operator]
        finally:
            qmod.input_quantizer = saved

    return ("unsigned" if unsigned else "signed"), run


def build_candidates(
    qlayers: dict[str, QuantMixin],
    observers: dict[str, LayerObserver],
    spec: QuantSpec,
    alphas: Sequence[float],
    granularities: Sequence[str],
    mode: str,
    no_smoothing: Collection[str] = (),
) -> tuple[dict[str, dict[str, Candidate]], dict[str, str]]:
    """Candidates per layer, and the im2col refusals (layer -> reason) for the report. Layers named in
    `no_smoothing` (their forward computes the weight) get no SmoothQuant candidates."""
    candidates: dict[str, dict[str, Candidate]] = {}
    refused: dict[str, str] = {}
    for name, qmod in qlayers.items():
        obs = observers[name]
        cands: dict[str, Candidate] = {"naive": (lambda args, _m=qmod: _m(*args))}  # type: ignore[misc]
        if obs.nonnegative:
            alt_name, fn = alt_sign_candidate(qmod, obs, spec)
            cands[alt_name] = fn
        if name in no_smoothing:
            candidates[name] = cands
            continue
        x_absmax = obs.chan_absmax.clone() if obs.chan_absmax is not None else None
        if "channel" in granularities and x_absmax is not None:
            for a in alphas:
                cands[sq_key("channel", a)] = SmoothCandidate(
                    qmod, a, mode, x_absmax if mode == "static" else None
                )
        if "im2col" in granularities:
            why = im2col_refusal(qmod)  # type: ignore[arg-type]
            if why is not None:
                refused[name] = why
            elif mode == "dynamic" or obs.col_absmax is not None:
                col = obs.col_absmax.clone() if obs.col_absmax is not None else None
                for a in alphas:
                    cands[sq_key("im2col", a)] = Im2colCandidate(qmod, a, mode, spec.a_bits, col)
        candidates[name] = cands
    return candidates, refused


def wants_columns(module: nn.Module) -> bool:
    return im2col_refusal(module) is None
