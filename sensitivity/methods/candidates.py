"""The isolated candidates scored for each layer inside the FP pass: naive, the other activation sign,
and SmoothQuant per alpha (channel granularity; im2col for research): each method's `candidate`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sensitivity.methods.base import Candidate, LayerStats, sq_key
from sensitivity.methods.im2col import Im2colCandidate, im2col_refusal
from sensitivity.methods.smoothquant import SmoothCandidate
from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.spec import QuantSpec

__all__ = ["alt_sign_candidate", "build_candidates", "sq_key"]


def alt_sign_candidate(qmod: QuantMixin, obs: LayerStats, spec: QuantSpec) -> tuple[str, Candidate]:
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
    observers: dict[str, LayerStats],
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
