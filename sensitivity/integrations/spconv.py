"""spconv (sparse 3D convolution) support: quantized sparse convs and spconv's CPU pitfalls.

spconv is the ``lidar`` extra: ``pip install 'sensitivity[lidar]'`` installs the CPU build (``spconv``).
On CUDA 12 machines install the wheel built for the local CUDA instead (``spconv-cu120``, ``spconv-cu121``,
``spconv-cu124`` or ``spconv-cu126``: same API, same ``import spconv``); only one spconv wheel may be
installed at a time. spconv is imported lazily, on first use: without it every dense model still scans,
and a model with spconv layers gets `SpconvUnavailableError`, which names the extra.

Quantized sparse convs (`QuantSubMConv3d`, `QuantSparseConv3d`, `QuantSparseInverseConv3d`,
`QuantSparseConvTranspose3d`, and the 1d/2d/4d variants) subclass the spconv layer they replace, like the
dense ones: the activation is quantized per tensor on `SparseConvTensor.features` ([N_active, Cin]), the
weight (spconv layout [Cout, k..., Cin]) per output channel (axis 0), and SmoothQuant divides the features
per input channel (the last axis of both). The sparse pattern (indices, rule book) is never touched: only
feature values change, so the quantized model's active sites are the FP model's, in the same order.

CPU pitfalls of spconv 2.3.8 handled here:

- a conv with a bias in eval mode asserts "cpu don't support act and bias". The quantized layers run the
  conv without bias and add it to the features afterwards (what spconv itself does in train mode);
  `cpu_bias_fallback` makes the *FP* spconv layers do the same (OpenPCDet's SparseBasicBlock convs have
  ``bias=True``, so the FP reference of a real CenterPoint would otherwise crash on CPU).
- several intra-op threads occasionally give wrong SubMConv3d outputs: `single_thread_if_sparse` runs
  a block with one torch thread when the model has spconv layers on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sensitivity.errors import SensitivityError
from sensitivity.integrations.spconv_macs import rule_pairs, sparse_macs
from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.registry import Family, register_family
from sensitivity.spec import QuantSpec

__all__ = [
    "INSTALL_HINT",
    "SPCONV",
    "SpconvUnavailableError",
    "add_cpu_bias_fallback_",
    "cpu_backward",
    "cpu_bias_fallback",
    "is_sparse_conv",
    "is_spconv_module",
    "require_spconv",
    "rule_pairs",
    "single_thread_if_sparse",
    "sparse_conv_types",
    "sparse_quant_class_for",
    "spconv_available",
]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'sensitivity[lidar]' (CPU build), or on a CUDA 12 machine the matching "
    "spconv-cu120 / spconv-cu121 / spconv-cu124 / spconv-cu126"
)


class SpconvUnavailableError(SensitivityError, ImportError):
    """spconv is needed (a model with sparse convs, the LiDAR demo) but cannot be imported."""


def is_spconv_module(module: nn.Module) -> bool:
    """True for modules whose class is (or, like our quantized wrappers, derives from) a spconv class;
    checked by module name, so spconv is imported only where it is used."""
    return any(c.__module__.split(".", 1)[0] == "spconv" for c in type(module).__mro__[:-1])


# ------------------------------------------------------------------------------------------- import
@functools.cache
def _import_spconv() -> ModuleType:
    try:
        import spconv.pytorch as sp
    except Exception as exc:  # missing, or a broken install (a CUDA wheel without CUDA, say)
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise SpconvUnavailableError(
            f"sparse convolutions (LiDAR models) need spconv, which cannot be imported ({detail}): "
            + INSTALL_HINT
        ) from exc
    return sp


def require_spconv() -> ModuleType:
    """`spconv.pytorch`, or `SpconvUnavailableError` naming the ``lidar`` extra."""
    try:
        return _import_spconv()
    except SpconvUnavailableError:
        _import_spconv.cache_clear()  # so that installing spconv later in the session works
        raise


def spconv_available() -> bool:
    try:
        require_spconv()
    except SpconvUnavailableError:
        return False
    return True


@functools.cache
def sparse_conv_types() -> tuple[type[nn.Module], ...]:
    """Every spconv convolution class (SubMConv3d, SparseConv3d, SparseInverseConv3d, ... in 1-4 d)."""
    sp = require_spconv()
    from spconv.pytorch import conv

    found = [
        obj
        for obj in vars(conv).values()
        if isinstance(obj, type)
        and issubclass(obj, conv.SparseConvolution)
        and obj is not conv.SparseConvolution
        and obj.__module__ == conv.__name__
    ]
    # the public names first, in a stable order (repr / tests)
    found.sort(key=lambda c: (not hasattr(sp, c.__name__), c.__name__))
    return tuple(found)


def is_sparse_conv(module: nn.Module) -> bool:
    """True for an spconv convolution of exactly a spconv type (imports spconv only for spconv modules)."""
    return is_spconv_module(module) and type(module) in sparse_conv_types()


# ------------------------------------------------------------------------------------ quantized layers
class _QuantSparseConv(QuantMixin):
    """Fake-quantized spconv convolution: features per tensor, weight [Cout, k..., Cin] per output channel.

    The bias (and a fused activation, residual `add_input`) is applied here after the conv, never inside
    spconv: its CPU kernels refuse bias and activation in eval mode, and adding it afterwards is how spconv
    itself computes the training forward (numerically the same sum). With spconv's rarely used fusions the
    result is act(conv + bias + add_input). Only feature values change, never the indices.
    """

    input_channel_axis = -1

    def _quant_input(self, x: Any) -> Any:
        feats = x.features
        if self.smoother is not None:
            feats = self.smoother(feats)
        return x.replace_feature(self.input_quantizer(feats))

    def _weight_input_scale(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(*([1] * (self.weight.dim() - 1)), -1)

    def weight_input_absmax(self) -> torch.Tensor:
        w = self.weight.detach().abs()
        return w.amax(dim=tuple(range(w.dim() - 1))).float()

    def _forward_with(self, x: Any, weight: torch.Tensor, add_input: Any = None) -> Any:
        # spconv's own functional path with the given weight: no swap of `self.weight`, no copy of it
        out = self._conv_forward(  # type: ignore[attr-defined]
            self.training,
            x,
            weight,
            None,
            name=self.name,  # type: ignore[attr-defined]
            sparse_unique_name=self._sparse_unique_name,  # type: ignore[attr-defined]
        )
        feats = out.features
        bias = self.bias  # type: ignore[attr-defined]
        if bias is not None:
            feats = feats + bias.to(feats.dtype)
        if add_input is not None:
            feats = feats + add_input.features
        act = self.act_type  # type: ignore[attr-defined]
        if act != type(act).None_:
            from spconv.pytorch.conv import _apply_act

            feats = _apply_act(feats, act, self.act_alpha, self.act_beta)  # type: ignore[attr-defined]
        return out.replace_feature(feats)

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec, act_unsigned: bool = False) -> nn.Module:
        """As for dense layers, after checking spconv's weight layout [Cout, k..., Cin] (KRSC)."""
        w = module.weight
        expected = (module.out_channels, *module.kernel_size, module.in_channels)  # type: ignore[attr-defined]
        if tuple(w.shape) != tuple(expected):
            raise SensitivityError(
                f"{type(module).__name__} weight has shape {tuple(w.shape)}, not spconv's [Cout, k..., Cin] "
                f"{expected}: set SPCONV_SAVED_WEIGHT_LAYOUT=KRSC (spconv >= 2.2's default layout)"
            )
        return super().from_float(module, spec, act_unsigned)


@functools.cache
def _quant_classes() -> dict[type[nn.Module], type[nn.Module]]:
    """{spconv conv class: its quantized subclass}, built once spconv is importable.

    The classes live at module level under their own names (see `__getattr__`), so a pickled quantized
    model refers to `sensitivity.integrations.spconv.QuantSubMConv3d` like any other class."""
    classes: dict[type[nn.Module], type[nn.Module]] = {}
    for base in sparse_conv_types():
        name = f"Quant{base.__name__}"
        cls = type(name, (_QuantSparseConv, base), {"_float_cls": base, "__module__": __name__})
        cls.__qualname__ = name
        cls.__doc__ = f"Fake-quantized spconv `{base.__name__}` (see `_QuantSparseConv`)."
        classes[base] = cls
    return classes


def sparse_quant_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for exactly this spconv type; None for spconv modules that are not convs
    (SparseSequential, pooling, ToDense). Raises `SpconvUnavailableError` when spconv cannot be imported."""
    return _quant_classes().get(type(module))


def __getattr__(name: str) -> type[nn.Module]:
    """`QuantSubMConv3d` & co., created on first access (spconv is imported then, not at import time):
    unpickling a quantized sparse model without spconv raises `SpconvUnavailableError`, naming the extra."""
    if name.startswith(("QuantSubM", "QuantSparse")):
        for cls in _quant_classes().values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- CPU pitfalls
def _sparse_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if is_spconv_module(m))


def _on_cpu(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return not tensors or any(t.device.type == "cpu" for t in tensors)


_logged_single_thread = False


@contextlib.contextmanager
def single_thread_if_sparse(model: nn.Module) -> Iterator[bool]:
    """Run the block with one torch intra-op thread when `model` has spconv layers on CPU; yields whether
    it did. spconv's CPU kernels with several threads occasionally return wrong SubMConv3d outputs (2-5
    of 400 calls with 2 threads, none of 1,600 with one), which would show up as quantization error. The
    previous thread count is restored on exit; the first time in a process it is logged (INFO)."""
    global _logged_single_thread
    before = torch.get_num_threads()
    sparse_on_cpu = any(True for _ in _sparse_modules(model)) and _on_cpu(model)
    if not (before > 1 and sparse_on_cpu):
        if sparse_on_cpu:
            with cpu_backward():
                yield False
        else:
            yield False
        return
    if not _logged_single_thread:
        _logged_single_thread = True
        log.info(
            "spconv layers on CPU: running them with 1 torch thread instead of %d "
            "(spconv's CPU kernels race with several threads)",
            before,
        )
    torch.set_num_threads(1)
    try:
        with cpu_backward():
            yield True
    finally:
        torch.set_num_threads(before)


_FLIPPED = "_sensitivity_cpu_bias_flipped"


def _needs_bias_fallback(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None and not isinstance(module, QuantMixin)


def _flip_to_train(module: nn.Module, args: tuple) -> None:
    feats = getattr(args[0], "features", None) if args else None
    if module.training or not isinstance(feats, torch.Tensor) or feats.is_cuda:
        return
    module.__dict__[_FLIPPED] = True
    module.training = True


def _flip_back(module: nn.Module, args: tuple, output: Any) -> None:
    if module.__dict__.pop(_FLIPPED, False):
        module.training = False


def add_cpu_bias_fallback_(model: nn.Module) -> list[RemovableHandle]:
    """Let `model`'s FP spconv convs that have a bias run in eval mode on CPU; returns the hook handles.

    spconv 2.3.8 asserts "cpu don't support act and bias" for those; in train mode it runs the conv without
    bias and adds the bias after, the same sum (2e-7 from dense F.conv3d). A forward pre-hook puts each
    such conv (the conv alone, never BatchNorm) in train mode for its own call on CPU tensors, and a forward
    hook puts it back, so `model.eval()` elsewhere does not undo the fix. The hooks take the module as an
    argument (no closures): they survive `copy.deepcopy`, which is how the scan's FP copy keeps them.
    Quantized layers handle the bias themselves and are skipped. Idempotent."""
    handles: list[RemovableHandle] = []
    for mod in model.modules():
        if not is_spconv_module(mod) or not _needs_bias_fallback(mod) or not is_sparse_conv(mod):
            continue
        if any(h is _flip_to_train for h in mod._forward_pre_hooks.values()):
            continue
        handles.append(mod.register_forward_pre_hook(_flip_to_train, prepend=True))
        handles.append(mod.register_forward_hook(_flip_back))
    return handles


@contextlib.contextmanager
def cpu_bias_fallback(model: nn.Module) -> Iterator[nn.Module]:
    """`add_cpu_bias_fallback_` for the duration of the block (copies made inside keep the hooks)."""
    handles = add_cpu_bias_fallback_(model)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------- the family
def _backward_available(first_input: Any) -> bool:
    """CUDA features: spconv's own backward. CPU features: its CPU gather-mm-scatter backward, reachable
    inside `cpu_backward` (the scan's run context), where the CUDA stream query that blocks it is answered."""
    feats = getattr(first_input, "features", first_input)
    if not isinstance(feats, torch.Tensor):
        return False
    return feats.is_cuda or _cpu_backward_on


_cpu_backward_on = False


@contextlib.contextmanager
def cpu_backward() -> Iterator[None]:
    """spconv 2.3's `indice_conv_backward` has a CPU path (gather, mm, scatter-add per kernel tap) but asks
    for the current CUDA stream first, which asserts on a CPU-only torch. Inside this block that query
    answers 0 (no stream) when CUDA is unavailable, so the output probes reach every sparse layer on CPU
    with spconv's own backward (checked against dense Conv3d gradients in the tests)."""
    global _cpu_backward_on
    try:
        import spconv.pytorch.ops as ops
    except ImportError:  # no spconv: nothing to patch (a model naming spconv types is refused elsewhere)
        ops = None
    if ops is None or torch.cuda.is_available() or _cpu_backward_on or not hasattr(ops, "get_current_stream"):
        yield
        return
    original = ops.get_current_stream
    ops.get_current_stream = lambda: 0
    _cpu_backward_on = True
    try:
        yield
    finally:
        ops.get_current_stream = original
        _cpu_backward_on = False


def _quant_class(module: nn.Module) -> type[nn.Module] | None:
    return None if isinstance(module, QuantMixin) else sparse_quant_class_for(module)


SPCONV = Family(
    name="spconv",
    package="spconv",
    owns=is_spconv_module,
    quant_class=_quant_class,
    input_channel_axis=lambda m: -1,  # features are [N_active, C]
    foldable=lambda m: not isinstance(m, QuantMixin) and is_sparse_conv(m),
    macs=sparse_macs,
    prepare_model_=add_cpu_bias_fallback_,
    run_context=single_thread_if_sparse,
    backward=_backward_available,
)
register_family(SPCONV)
