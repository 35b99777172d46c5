"""Peers of the compiled predictors: what a user could run instead of our TVM-compiled PFP.

- ``pfp_torch_compile``: the PyTorch PFP reference (:func:`pfp.backends.torch_ref.pfp_forward`)
  under ``torch.compile`` (inductor, CPU, one whole graph, static shapes);
- ``det_torch_compile``: the deterministic twin (posterior means) under ``torch.compile``;
- ``det_onnxruntime`` / ``pfp_onnxruntime``: the twin / the PFP reference exported with
  ``torch.onnx.export(dynamo=True)`` and run by ONNX Runtime's CPU execution provider.

Each peer is built for one batch size (compiled or exported once, before any timing), checked
against the eager PyTorch reference on the benchmark's input (:class:`PeerMismatchError` if it
computes something else), and offers the compiled predictors' ``time(number=, repeat=, x=)``
contract, so :func:`pfp.bench.time_side_by_side` interleaves it with them. ONNX and ONNX
Runtime are imported only when an ONNX Runtime peer is made.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch

from pfp.backends import base
from pfp.backends.base import Backend
from pfp.backends.torch_ref import deterministic_forward, pfp_forward, scale_variance
from pfp.bnn import Posterior
from pfp.config import Peer, Variant
from pfp.convert import PFPModel

__all__ = ["COMPILE_MODE", "PEER_ATOL_FRACTION", "PEER_RTOL", "OnnxRuntimePeer", "PeerMismatchError", "TorchCompiledPeer",
           "check_agrees", "make_peer", "make_peers", "reference_outputs"]

#: torch.compile's mode: inductor's default ("max-autotune-no-cudagraphs", which benchmarks GEMM
#: templates per shape while compiling, has not been measured here).
COMPILE_MODE = "default"
#: A peer's outputs must match the eager reference to float32 round-off: this relative error ...
PEER_RTOL = 1e-4
#: ... plus this fraction of the tensor's largest value (sums whose terms cancel, and ONNX's
#: erfc, which the exporter writes as 1 - erf and so loses Phi's far lower tail, ~1e-7 absolute).
PEER_ATOL_FRACTION = 1e-5


class PeerMismatchError(RuntimeError):
    """A peer's outputs differ from the eager PyTorch reference: its timing would compare other work."""


def check_agrees(name: str, outputs: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...], *,
                 rtol: float = PEER_RTOL, atol_fraction: float = PEER_ATOL_FRACTION) -> float:
    """Raise :class:`PeerMismatchError` unless every output matches the reference; returns the largest error
    relative to each tensor's scale."""
    if len(outputs) != len(reference):
        raise PeerMismatchError(f"{name}: {len(outputs)} outputs, the reference has {len(reference)}")
    worst = 0.0
    for index, (actual, expected) in enumerate(zip(outputs, reference)):
        actual, expected = np.asarray(actual), np.asarray(expected)
        if actual.shape != expected.shape:
            raise PeerMismatchError(f"{name}: output {index} has shape {actual.shape}, the reference {expected.shape}")
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        error = np.abs(actual.astype(np.float64) - expected)
        bad = ~(error <= rtol * np.abs(expected) + atol_fraction * scale)  # also catches nan
        if bad.any():
            raise PeerMismatchError(f"{name}: output {index} differs from the eager PyTorch reference at {int(bad.sum())} of "
                                    f"{bad.size} entries (largest difference {float(np.nanmax(error)):.3g}, tensor scale "
                                    f"{scale:.3g}; tolerance {rtol:g} relative + {atol_fraction:g} of the scale)")
        worst = max(worst, float(error.max()) / scale if scale else 0.0)
    return worst


def reference_outputs(variant: Variant, pfp_model: PFPModel, posterior: Posterior, x: np.ndarray, *,
                      variance_scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """The eager PyTorch reference's outputs of ``variant`` (pfp: logit mean and variance; det: logits)."""
    reference = base.create(Backend.TORCH, variant, pfp_model, posterior, batch_size=x.shape[0],
                            variance_scale=variance_scale)
    return reference.predict(x)


class _PFPNetwork(torch.nn.Module):
    """The PFP reference with the calibrated variances applied once (as a compiled model holds them)."""

    def __init__(self, pfp_model: PFPModel, variance_scale: float) -> None:
        super().__init__()
        self.spec = pfp_model.spec
        self.params = {name: scale_variance(p, variance_scale) for name, p in pfp_model.params.items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pfp_forward(self.spec, self.params, x)


class _TwinNetwork(torch.nn.Module):
    """The deterministic twin: the converted layer order with the posterior means (as :data:`Variant.DET`)."""

    def __init__(self, pfp_model: PFPModel, posterior: Posterior) -> None:
        super().__init__()
        self.spec = pfp_model.spec
        self.weights = posterior.mean_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (deterministic_forward(self.spec, self.weights, x),)


def _network(variant: Variant, pfp_model: PFPModel, posterior: Posterior, variance_scale: float) -> torch.nn.Module:
    return _PFPNetwork(pfp_model, variance_scale) if variant is Variant.PFP else _TwinNetwork(pfp_model, posterior)


def _timings(results_ms: list[float], number: int, repeat: int) -> dict[str, float]:
    return {"mean_ms": float(np.mean(results_ms)), "median_ms": float(statistics.median(results_ms)),
            "std_ms": float(np.std(results_ms)), "number": number, "repeat": repeat}


class _Peer:
    """The timing loop every peer shares: one untimed call (as TVM's time_evaluator), then ``repeat`` means of ``number`` calls."""

    name: str
    #: largest difference from the eager reference, relative to each output's scale (set by :func:`make_peer`)
    max_error: float | None = None

    def _prepare(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _call(self, prepared: Any) -> None:
        raise NotImplementedError

    def _timing_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def time(self, *, number: int, repeat: int = 1, x: np.ndarray) -> dict[str, float]:
        """Milliseconds per call of the batch ``x`` (the batch size the peer was built for)."""
        prepared = self._prepare(np.ascontiguousarray(x, dtype=np.float32))
        results_ms = []
        with self._timing_context():
            self._call(prepared)
            for _ in range(repeat):
                start = time.perf_counter()
                for _ in range(number):
                    self._call(prepared)
                results_ms.append((time.perf_counter() - start) / number * 1e3)
        return _timings(results_ms, number, repeat)


class TorchCompiledPeer(_Peer):
    """A network under ``torch.compile`` (inductor), compiled for the batch of ``x`` here, before any timing.

    ``fullgraph=True``: one graph or an error (no silent fall-back to eager Python between
    graphs); timing runs with the compiler's "fail_on_recompile" stance, so a timed call can
    never be a compilation.
    """

    def __init__(self, name: str, network: torch.nn.Module, x: np.ndarray, *, mode: str = COMPILE_MODE) -> None:
        self.name, self.mode = name, mode
        self.batch_size = x.shape[0]
        self._compiled = torch.compile(network, fullgraph=True, dynamic=False, mode=mode)
        start = time.perf_counter()
        # every peer compiles the same forward code for another model or batch: a new cache
        # entry each, past dynamo's default limit of 8 in one benchmark run; never fall back to eager
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
            self._compiled(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        self.compile_seconds = time.perf_counter() - start

    def _timing_context(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.compiler.set_stance("fail_on_recompile"))
        return stack

    def _prepare(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x)

    def _call(self, prepared: torch.Tensor) -> None:
        self._compiled(prepared)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        with self._timing_context():
            return tuple(out.numpy() for out in self._compiled(self._prepare(np.ascontiguousarray(x, dtype=np.float32))))

    def describe(self) -> dict[str, Any]:
        return {"runtime": f"torch {torch.__version__}", "compiler": "torch.compile (inductor, fullgraph, dynamic=False)",
                "compile_mode": self.mode, "threads": torch.get_num_threads(), "compile_s": round(self.compile_seconds, 3),
                "max_error_vs_eager": self.max_error}


@contextlib.contextmanager
def _quiet_export():
    """The exporter's notes (missing torchvision ops, deprecations) are not the stage's business."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class OnnxRuntimePeer(_Peer):
    """A network exported to ONNX (``torch.onnx.export(dynamo=True)``, the batch of ``x`` fixed) run by ONNX Runtime.

    CPU execution provider with ``threads`` intra-op threads (the compiled predictors' count),
    one inter-op thread, all graph optimisations. Timed calls use an I/O binding with the
    input and preallocated outputs bound once, so a call is the session's run and nothing else.
    """

    def __init__(self, name: str, network: torch.nn.Module, x: np.ndarray, *, threads: int) -> None:
        import onnxruntime as ort  # only when an ONNX Runtime peer is asked for

        self.name, self.threads, self.batch_size = name, threads, x.shape[0]
        start = time.perf_counter()
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(network, (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),),
                                        dynamo=True, verbose=False)
        proto = program.model_proto
        self.opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.export_seconds = time.perf_counter() - start
        self._ort = ort
        self._input = self._session.get_inputs()[0].name
        self.version = ort.__version__

    def _prepare(self, x: np.ndarray) -> Any:
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input, x)
        for output in self._session.get_outputs():
            value = self._ort.OrtValue.ortvalue_from_shape_and_type(output.shape, np.float32, "cpu", 0)
            binding.bind_ortvalue_output(output.name, value)
        return binding, x  # the binding reads x's buffer: keep it alive

    def _call(self, prepared: Any) -> None:
        self._session.run_with_iobinding(prepared[0])

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self._session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)}))

    def describe(self) -> dict[str, Any]:
        return {"runtime": f"onnxruntime {self.version} (CPUExecutionProvider)",
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}, opset {self.opset}",
                "threads": self.threads, "compile_s": round(self.export_seconds, 3), "max_error_vs_eager": self.max_error}


def make_peer(peer: Peer | str, pfp_model: PFPModel, posterior: Posterior, x: np.ndarray, *, variance_scale: float = 1.0,
              threads: int, reference: tuple[np.ndarray, ...] | None = None) -> TorchCompiledPeer | OnnxRuntimePeer:
    """``peer`` built for the batch ``x`` and checked against the eager reference on ``x``.

    ``threads``: ONNX Runtime's intra-op threads (torch.compile runs on torch's pool).
    ``reference``: the eager outputs of the peer's variant on ``x`` if already computed.
    Raises :class:`PeerMismatchError` if the peer computes anything else.
    """
    peer = Peer(peer)
    network = _network(peer.variant, pfp_model, posterior, variance_scale)
    if peer in (Peer.PFP_TORCH_COMPILE, Peer.DET_TORCH_COMPILE):
        made: TorchCompiledPeer | OnnxRuntimePeer = TorchCompiledPeer(peer.value, network, x)
    else:
        made = OnnxRuntimePeer(peer.value, network, x, threads=threads)
    if reference is None:
        reference = reference_outputs(peer.variant, pfp_model, posterior, x, variance_scale=variance_scale)
    made.max_error = check_agrees(peer.value, made.predict(x), reference)
    return made


def make_peers(peers: list[Peer], pfp_model: PFPModel, posterior: Posterior, x: np.ndarray, *, variance_scale: float = 1.0,
               threads: int) -> dict[str, TorchCompiledPeer | OnnxRuntimePeer]:
    """Each of ``peers`` built and checked (:func:`make_peer`), keyed by its latency.json key ``PEER_ms``."""
    references: dict[Variant, tuple[np.ndarray, ...]] = {}
    made = {}
    for peer in map(Peer, peers):
        if peer.variant not in references:
            references[peer.variant] = reference_outputs(peer.variant, pfp_model, posterior, x, variance_scale=variance_scale)
        made[f"{peer.value}_ms"] = make_peer(peer, pfp_model, posterior, x, variance_scale=variance_scale, threads=threads,
                                             reference=references[peer.variant])
    return made
