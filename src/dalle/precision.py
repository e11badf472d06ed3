"""Which arithmetic a stage computes in: fp32, or bf16 / fp16 autocast (paper §2.4 trains in
16-bit), and `auto`, chosen by measurement on the machine at hand.

`auto` on CUDA follows the device: bf16 where it has bf16 tensor cores, else fp16 (the paper's
V100 format, with per-resblock gradient scaling in the prior). On CPU it times the stage's own
GEMMs (every F.linear / F.conv2d of one forward pass of its model, at their real shapes and
memory layout: `record_ops`) once in fp32 and in bf16, then the whole forward pass under both
autocasts (the GEMMs alone missed that KV-cached sampling's tiny per-token GEMMs are not worth
the casts), and runs the stage's short loss check (the model at its initial weights on one
batch, in both precisions): bf16 is chosen only where its GEMMs are not slower (`MARGIN`), its
forward pass is faster by `FORWARD_MARGIN`, AND the two losses agree within `LOSS_TOL`. Timings
are best-of-n (a shared machine only adds time). The choice and
its figures are cached per machine in a JSON file outside the repository (`cache_path()`:
keyed by CPU model, bf16 instruction flags, torch version, threads, stage and shapes), never a
DVC dependency: a stage records the precision it used in its metrics and MLflow params instead.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger("dalle.precision")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MARGIN = 1.0  # bf16's GEMMs must not be slower than fp32's at the stage's shapes
FORWARD_MARGIN = 1.10  # and the stage's whole forward pass must be at least 10% faster
LOSS_TOL = 0.01  # and the loss at initial weights equal within 1% (relative)
LossCheck = Callable[[str], float]  # precision -> loss of the stage's model on one fixed batch


@dataclass(frozen=True)
class Op:
    """One of a stage's matrix products at its real shape, timed in both dtypes: "linear"
    (input [.., k] times weight [n, k]) or "conv" (F.conv2d of input [b, c, h, w] by [o, c, kh, kw])."""

    kind: str
    shape: tuple[int, ...]  # the input's
    weight: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    flops: float = 0.0  # of one call
    count: int = 1  # calls per forward pass
    channels_last: bool = False  # the conv's input layout (oneDNN's kernels differ by layout)


class _Recorder(TorchFunctionMode):
    """Records every F.linear / F.conv2d of a forward pass with its shapes (the model's GEMMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[tuple, Op] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (F.linear, F.conv2d) and torch.is_tensor(out):
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if func is F.linear:
                op = Op("linear", tuple(x.shape), tuple(w.shape), flops=2.0 * x.numel() * w.shape[0])
            else:
                stride, padding = (kwargs.get(k, args[i] if len(args) > i else d)
                                   for k, i, d in (("stride", 3, 1), ("padding", 4, 0)))
                pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
                layout = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                    and not x.is_contiguous()
                op = Op("conv", tuple(x.shape), tuple(w.shape), pair(stride), pair(padding),
                        2.0 * out.numel() * w[0].numel(), channels_last=layout)
            key = (op.kind, op.shape, op.weight, op.stride, op.padding, op.channels_last)
            prev = self.ops.get(key)
            self.ops[key] = replace(op, count=prev.count + 1) if prev else op
        return out


def record_ops(forward: Callable[[], Any]) -> list[Op]:
    """The linear and conv2d calls of one run of `forward` (no gradients), with their counts."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        forward()
    return list(rec.ops.values())


@dataclass(frozen=True)
class Choice:
    """A resolved precision and why (what gets logged and recorded with the stage)."""

    precision: str  # fp32 | bf16 | fp16
    reason: str
    figures: dict[str, float] = field(default_factory=dict)  # GFLOP/s and losses measured


def half_dtype(precision: str) -> torch.dtype:
    """The 16-bit type of a resolved 16-bit precision (what 16-bit parameters are stored in)."""
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(precision: str, device: torch.device) -> ContextManager[Any]:
    """A resolved precision's autocast: bf16 or fp16 (on CPU too, when asked for explicitly:
    slow there, but the same numerics as a GPU's; `auto` never picks fp16 on CPU); fp32: none."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=half_dtype(precision))


# ----------------------------------------------------------------------------- the cache
def cpu_model() -> str:
    """The CPU's model name and its bf16 instruction flags (what decides bf16 GEMM speed)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    fast = sorted(flags & {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_tile"})
    return f"{name} [{' '.join(fast) or 'no bf16 instructions'}]"


def machine_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_path() -> Path:
    """$DALLE_PRECISION_CACHE, else <XDG cache>/dalle/precision.json (outside the repository)."""
    if os.environ.get("DALLE_PRECISION_CACHE"):
        return Path(os.environ["DALLE_PRECISION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dalle" / "precision.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or torn: measure again


def _write_cache(path: Path, key: str, choice: Choice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = asdict(choice)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home is no reason to fail a stage
        log.warning("precision cache %s not written (%s)", path, exc)


# ----------------------------------------------------------------------------- measuring
def _operands(op: Op, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(op.shape, generator=g).to(dtype), torch.randn(op.weight, generator=g).to(dtype)
    if op.channels_last:  # the layout the model ran in
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return x, w


def _call(op: Op, x: torch.Tensor, w: torch.Tensor) -> None:
    if op.kind == "linear":
        F.linear(x, w)
    else:
        F.conv2d(x, w, stride=op.stride, padding=op.padding)


def _best_call(op: Op, x: torch.Tensor, w: torch.Tensor, rounds: int) -> float:
    """Seconds of one call: the best of `rounds` timings, each of enough calls to last >= 2 ms
    (a shared machine only ever adds time; tiny per-token GEMMs need the repetition)."""
    t0 = time.perf_counter()
    _call(op, x, w)  # warm-up: allocation, kernel selection
    reps = max(1, min(1000, int(0.002 / max(time.perf_counter() - t0, 1e-7))))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            _call(op, x, w)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def time_ops(ops: Sequence[Op], rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of a forward pass's ops in fp32 and in bf16 on CPU, each op weighted by its call
    count, from the best of `rounds` timings per op and dtype (the dtypes alternate)."""
    flops = sum(op.flops * op.count for op in ops)
    total = {torch.float32: 0.0, torch.bfloat16: 0.0}
    with torch.no_grad():
        for op in ops:
            for dtype in total:
                total[dtype] += op.count * _best_call(op, *_operands(op, dtype), rounds)
    return {"fp32_gflops": flops / total[torch.float32] / 1e9,
            "bf16_gflops": flops / total[torch.bfloat16] / 1e9, "gflop_per_forward": flops / 1e9}


def time_forward(forward: Callable[[str], Any], rounds: int = 4) -> dict[str, float]:
    """Seconds of the stage's own forward pass under each precision: the best of `rounds`
    interleaved rounds after two warm-ups (what the GEMMs alone miss: casts, memory-bound ops)."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for rep in range(rounds + 2):
        for p in ("fp32", "bf16") if rep % 2 else ("bf16", "fp32"):
            t0 = time.perf_counter()
            forward(p)
            if rep >= 2:
                times[p].append(time.perf_counter() - t0)
    return {f"forward_{p}_s": min(t) for p, t in times.items()}


def _decide_cpu(ops: Sequence[Op], loss_check: Optional[LossCheck],
                forward: Optional[Callable[[str], Any]]) -> Choice:
    figures = time_ops(ops)
    ratio = figures["bf16_gflops"] / figures["fp32_gflops"]
    speed = f"bf16 {figures['bf16_gflops']:.0f} vs fp32 {figures['fp32_gflops']:.0f} GFLOP/s"
    if ratio < MARGIN:
        return Choice("fp32", f"{speed} at the stage's shapes: bf16 not faster", figures)
    if forward is not None:  # the GEMMs are faster: is the stage's forward pass as a whole?
        figures.update(time_forward(forward))
        whole = figures["forward_fp32_s"] / figures["forward_bf16_s"]
        speed += f", forward pass {whole:.2f}x"
        if whole < FORWARD_MARGIN:
            return Choice("fp32", f"{speed}: the GEMMs are faster, the forward pass is not", figures)
    if loss_check is not None:
        l32, l16 = float(loss_check("fp32")), float(loss_check("bf16"))
        figures.update(loss_fp32=l32, loss_bf16=l16)
        if not abs(l16 - l32) <= LOSS_TOL * abs(l32):
            return Choice("fp32", f"{speed}, but the loss check differs: bf16 {l16:.4f} vs "
                                  f"fp32 {l32:.4f}", figures)
        speed += f"; loss check equal (bf16 {l16:.4f}, fp32 {l32:.4f})"
    return Choice("bf16", f"{speed} ({ratio:.2f}x)", figures)


def resolve(requested: str, device: torch.device, stage: str, ops: Sequence[Op],
            loss_check: Optional[LossCheck] = None,
            forward: Optional[Callable[[str], Any]] = None) -> Choice:
    """The precision a stage runs in; `auto` measured once per machine (see the module doc)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {PRECISIONS}")
    if requested != "auto":
        choice = Choice(requested, "set in params")
    elif device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        choice = Choice("bf16" if bf16 else "fp16", f"{torch.cuda.get_device_name(device)}: "
                        + ("bf16 supported" if bf16 else "no bf16 support, fp16"))
    elif device.type != "cpu":
        choice = Choice("fp32", f"device {device.type}: no measured 16-bit path")
    else:
        key = f"{machine_key()} | {stage} | " + ";".join(
            f"{o.kind}{list(o.shape)}x{list(o.weight)}{'cl' if o.channels_last else ''}" for o in ops)
        path = cache_path()
        cached = _read_cache(path).get(key)
        if isinstance(cached, dict) and cached.get("precision") in PRECISIONS[1:]:
            choice = Choice(cached["precision"], f"cached in {path}: {cached.get('reason', '')}",
                            dict(cached.get("figures") or {}))
        else:
            choice = _decide_cpu(ops, loss_check, forward)
            _write_cache(path, key, choice)
    log.info("%s: precision %s (%s: %s)", stage, choice.precision, requested, choice.reason)
    return choice
