"""Per-token log-probs of the labels, fused: from logits, or from hidden states + LM-head weight.

``token_logprobs``: online log-sum-exp over vocabulary tiles, no (N x V) fp32 buffer; backward
writes one (N x V) gradient in the logits' dtype.
``linear_token_logprobs``: ignored tokens are dropped first; the forward never materialises
logits (Triton: blockwise ``hidden @ weight.T`` + online log-sum-exp); the backward recomputes
logits in token chunks of at most ``chunk_size`` rows (cuBLAS), turns each chunk into its
gradient in place and projects it to d(hidden) and d(weight) (8NHV FLOPs in all).
``linear_sequence_loss``: a loss of per-sequence log-probs with the gradients made in the forward,
over token chunks that hold whole groups of coupled sequences (6NHV FLOPs, no recompute).
"""
from __future__ import annotations

import os

import torch

from . import reference
from ._backend import interpreting, resolve_backend
from .validation import (
    check_finite,
    check_float,
    check_int,
    check_labels,
    check_same_device,
    check_shape,
)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pick_backend(backend, tensor, name):
    chosen = resolve_backend(backend, tensor)
    if chosen == "triton" and tensor.dtype not in _TRITON_DTYPES:
        if backend == "triton" or os.environ.get("AIHF_FAST_BACKEND") == "triton":
            raise TypeError(f"backend='triton' supports fp16/bf16/fp32 {name}, got {tensor.dtype}")
        return "torch"
    return chosen


def _check_temperature(temperature) -> float:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


# ----------------------------------------------------------------------------- Triton launches


def _row_block(V: int) -> tuple[int, int]:
    if interpreting():
        return min(_next_pow2(V), 64), 1
    block = min(_next_pow2(V), 4096)
    return block, (8 if block >= 2048 else 4)


def _triton_row_forward(logits2d, labels, ignore_index, inv_temp, return_entropy):
    from ._triton_kernels import _row_logprob_fwd_kernel

    N, V = logits2d.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else lse
    if N:
        block, warps = _row_block(V)
        _row_logprob_fwd_kernel[(N,)](
            logits2d, logits2d.stride(0), labels, logp, lse, entropy, V, ignore_index, inv_temp,
            BLOCK_V=block, RETURN_ENTROPY=return_entropy, num_warps=warps,
        )
    return logp, lse, (entropy if return_entropy else None)


def _dlogits_block(V: int) -> int:
    """Vocabulary columns per program of the d(logits) kernel (its tile)."""
    return min(_next_pow2(V), 64 if interpreting() else 2048)


def _triton_dlogits_(logits2d, out2d, labels, lse, grad_logp, entropy, grad_entropy, ignore_index, inv_temp,
                     col_offset=0, tile_pmax=None):
    """Write d(loss)/d(logits) into ``out2d`` (may be ``logits2d`` itself: in place).
    ``logits2d`` may hold vocabulary columns [col_offset, col_offset + width) only.
    tile_pmax: optional (N, cdiv(width, _dlogits_block(width))) fp32, filled with the largest
    softmax probability of each (row, kernel tile)."""
    from ._triton_kernels import _dlogits_kernel

    N, V = logits2d.shape
    if N == 0 or V == 0:
        return out2d
    block = _dlogits_block(V)
    has_ent = grad_entropy is not None
    _dlogits_kernel[(N, _cdiv(V, block))](
        logits2d, logits2d.stride(0), out2d, out2d.stride(0), labels, lse, grad_logp,
        entropy if has_ent else lse, grad_entropy if has_ent else grad_logp,
        tile_pmax if tile_pmax is not None else lse,
        V, col_offset, ignore_index, inv_temp, BLOCK_V=block, HAS_ENTROPY_GRAD=has_ent,
        WRITE_PMAX=tile_pmax is not None, num_warps=4 if interpreting() else 8,
    )
    return out2d


def _tma_ready(*tensors) -> bool:
    """TMA descriptors need 2-d tensors with a unit last stride, rows that neither overlap nor
    repeat (row stride >= row length), and 16-byte aligned rows and base."""
    return all(t.dim() == 2 and t.stride(-1) == 1 and t.stride(0) >= max(1, t.shape[-1])
               and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def _linear_schedule(x, w):
    """(kernel, meta, whether it takes TMA descriptors) of the fused forward on this device: the
    interpreter's small tiles; a pinned schedule (``AIHF_FAST_LINEAR_CONFIG=i``: tests every one,
    reproduces one); or autotuned over the pointer schedules, plus the TMA ones with
    ``AIHF_FAST_LINEAR_TMA=1`` where the GPU has TMA."""
    from ._triton_kernels import (
        LINEAR_FWD_SCHEDULES,
        _linear_lse_fwd_kernel,
        _linear_lse_fwd_kernel_autotuned,
        _linear_lse_fwd_kernel_autotuned_tma,
    )

    pinned = os.environ.get("AIHF_FAST_LINEAR_CONFIG")
    cfg = None
    if pinned is not None:
        if not (pinned.isdigit() and int(pinned) < len(LINEAR_FWD_SCHEDULES)):
            raise ValueError(f"AIHF_FAST_LINEAR_CONFIG must be an index in [0, {len(LINEAR_FWD_SCHEDULES)}) of the "
                             f"fused forward's schedules, got {pinned!r}")
        cfg = LINEAR_FWD_SCHEDULES[int(pinned)]
        if cfg.kwargs.get("USE_TMA") and not _tma_ready(x, w):
            raise ValueError(f"AIHF_FAST_LINEAR_CONFIG={pinned} is a TMA schedule, which needs hidden and weight with "
                             "unit last stride, distinct rows, 16-byte aligned rows and a 16-byte aligned start")
    if interpreting():  # small tiles; a pinned schedule's loads and program order
        flags = {k: v for k, v in (cfg.kwargs if cfg else {}).items() if k in ("USE_TMA", "PERSISTENT")}
        meta = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, GROUP_M=2, DOT_UPCAST=True, **flags)
        return _linear_lse_fwd_kernel, meta, bool(flags.get("USE_TMA"))
    if cfg is not None:
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return _linear_lse_fwd_kernel, meta, bool(meta.get("USE_TMA"))
    if os.environ.get("AIHF_FAST_AUTOTUNE", "1") == "0":  # fixed tile: fast compiles (tests)
        if x.dtype == torch.float32:  # fp32 tiles take twice the shared memory
            return _linear_lse_fwd_kernel, dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=3), False
        return _linear_lse_fwd_kernel, dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3), False
    if (os.environ.get("AIHF_FAST_LINEAR_TMA", "0") == "1" and torch.version.hip is None
            and torch.cuda.get_device_capability(x.device)[0] >= 9 and _tma_ready(x, w)):
        return _linear_lse_fwd_kernel_autotuned_tma, {}, True
    return _linear_lse_fwd_kernel_autotuned, {}, False


def _triton_linear_forward(x, w, labels, inv_temp, return_entropy):
    """x (M, H) compacted rows, w (V, H), labels (M,) all valid -> logp, lse, entropy (M,) fp32
    (None unless return_entropy), top1 (M,) bool: the label's logit is the row's largest."""
    import triton

    M, K = x.shape
    V = w.shape[0]
    dev = x.device
    if M == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        return empty, empty, (empty if return_entropy else None), torch.zeros(0, dtype=torch.bool, device=dev)
    kernel, meta, tma = _linear_schedule(x, w)
    # split boundaries are multiples of every BLOCK_V tried (the interpreter's small tile, or 128 / 256)
    unit = meta["BLOCK_V"] if meta.get("BLOCK_V", 256) < 128 else 256
    if interpreting():
        programs = 3  # several splits and persistent programs, so the merge and the loop are exercised
        n_splits = min(_cdiv(V, unit), 3)
    else:
        programs = torch.cuda.get_device_properties(dev).multi_processor_count
        # >= 16 splits: with GROUP_M = 8 token blocks, ~128 resident programs share their tiles
        n_splits = max(1, min(_cdiv(V, unit), max(16, _cdiv(2 * programs, _cdiv(M, 64)))))
    cols_per_split = _cdiv(_cdiv(V, unit), n_splits) * unit
    n_splits = _cdiv(V, cols_per_split)
    part = torch.empty((4 if return_entropy else 3, n_splits, M), dtype=torch.float32, device=dev)
    x_desc, w_desc = x, w  # unused by the pointer schedules
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # block shapes: the schedule's; under autotune each TMA configuration's hook sets its own
        bm, bv, bk = (meta.get(k, 64) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K"))
        x_desc, w_desc = TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bv, bk])

    def grid(m):
        work = triton.cdiv(M, m["BLOCK_M"]) * n_splits
        return (min(work, programs) if m.get("PERSISTENT") else work,)

    kernel[grid](
        x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1), x_desc, w_desc, labels,
        part[0], part[1], part[2], part[3] if return_entropy else part[0],
        M, V, K, inv_temp, cols_per_split, n_splits,
        RETURN_ENTROPY=return_entropy,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ROUND_LOGITS={torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0),
        **meta,
    )
    # merge the per-split partial log-sum-exps
    gmax = part[0].max(0).values
    scale = torch.exp(part[0] - gmax)
    total = (part[1] * scale).sum(0)
    lse = gmax + torch.log(total)
    target = part[2].sum(0)  # the label's split holds its logit, the others 0
    logp = target - lse
    entropy = lse - (part[3] * scale).sum(0) / total if return_entropy else None
    return logp, lse, entropy, target >= gmax


SLICE_COLUMNS = 16384


def default_chunk_size(num_tokens: int, vocab_size: int, element_size: int) -> int:
    """Vocabulary columns per backward chunk: a (tokens x chunk) buffer of ``AIHF_FAST_CHUNK_BYTES``
    if set, else of SLICE_COLUMNS columns kept within [256 MiB, 512 MiB]; a multiple of 128, at
    least 128. Every slice reads and writes the fp32 (tokens x H) d(hidden) once, a cost that
    relative to the slice's 6 x tokens x H x columns FLOPs depends only on the columns (~190 /
    columns on an H100/H200): a buffer that grows with the tokens halves it at 32k bf16 tokens
    (8192 columns, ~2.4%, instead of 4096 in a fixed 256 MiB), while the transient memory (buffer +
    fp32 d(hidden)) stays at 1 GiB there for H = 4096."""
    if os.environ.get("AIHF_FAST_CHUNK_BYTES"):
        budget = int(os.environ["AIHF_FAST_CHUNK_BYTES"])
    else:
        budget = min(512 << 20, max(256 << 20, num_tokens * element_size * SLICE_COLUMNS))
    cols = (budget // max(1, num_tokens * element_size)) // 128 * 128
    return max(1, min(vocab_size, max(128, cols)))


_ADDMM_OUT_DTYPE: dict = {}


def _addmm_out_dtype_works(device) -> bool:
    """Whether this torch/device runs addmm(bf16, bf16 -> fp32 accumulator) in place (probe once)."""
    key = str(device)
    if key not in _ADDMM_OUT_DTYPE:
        try:
            acc = torch.zeros(2, 2, device=device)
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE[key] = bool((acc == 2).all())
        except Exception:  # older torch, or a backend without it
            _ADDMM_OUT_DTYPE[key] = False
    return _ADDMM_OUT_DTYPE[key]


def _accumulate_mm(acc, a, b):
    """acc += a @ b, acc fp32 and a, b possibly low precision (fp32 accumulation in the GEMM)."""
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, out=acc)  # = acc.addmm_(a, b), in the form FLOP counters see
    elif acc.is_cuda and a.dtype == torch.bfloat16 and _addmm_out_dtype_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _linear_backward(x, w, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, chunk_size, need_dx, need_dw):
    """Recompute the logits one vocabulary slice at a time: z = x @ w[slice].T (M x C), turn z
    into its gradient in place with the saved log-sum-exp, then d(weight)[slice] = z.T @ x
    (written once) and d(hidden) += z @ w[slice] (fp32 accumulator, M x H). 6MHV FLOPs. In the
    inputs' own precision, also when called under autocast (a backward inside its context)."""
    with torch.autocast(x.device.type, enabled=False):
        return _linear_backward_slices(x, w, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, chunk_size,
                                       need_dx, need_dw)


def _linear_backward_slices(x, w, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, chunk_size, need_dx,
                            need_dw):
    M = x.shape[0]
    V, H = w.shape
    cols = chunk_size or default_chunk_size(M, V, x.element_size())
    single = cols >= V
    dw = torch.empty_like(w) if need_dw else None
    dx = None
    if need_dx:
        dx = torch.zeros_like(x, dtype=torch.float32) if not single else None
    if M == 0:
        if need_dw:
            dw.zero_()
        return (torch.zeros_like(x) if need_dx else None), dw
    ge = grad_entropy
    for c0 in range(0, V, cols):
        c1 = min(V, c0 + cols)
        ws = w[c0:c1]
        z = x @ ws.t()
        _triton_dlogits_(z, z, labels, lse, grad_logp, entropy if ge is not None else None, ge, -1, inv_temp,
                         col_offset=c0)
        if need_dw:
            torch.mm(z.t(), x, out=dw[c0:c1])
        if need_dx:
            if single:
                dx = z @ ws
            else:
                _accumulate_mm(dx, z, ws)
        del z
    if need_dx and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dw


# ----------------------------------------------------------------------------- autograd


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels, ignore_index, inv_temp, return_entropy):
        ctx.set_materialize_grads(False)  # an entropy read as a metric only costs no backward work
        logp, lse, entropy = _triton_row_forward(logits2d, labels, ignore_index, inv_temp, return_entropy)
        ctx.save_for_backward(logits2d, labels, lse, entropy if return_entropy else lse)
        ctx.ignore_index, ctx.inv_temp, ctx.return_entropy = ignore_index, inv_temp, return_entropy
        if not return_entropy:
            entropy = torch.zeros_like(logp)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits2d, labels, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad = torch.empty_like(logits2d, memory_format=torch.contiguous_format)
        _triton_dlogits_(
            logits2d, grad, labels, lse, grad_logp.contiguous(), entropy,
            None if grad_entropy is None else grad_entropy.contiguous(), ctx.ignore_index, ctx.inv_temp,
        )
        return grad, None, None, None, None


class _LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, inv_temp, return_entropy, chunk_size):
        ctx.set_materialize_grads(False)  # an entropy read as a metric only costs no backward work
        logp, lse, entropy, top1 = _triton_linear_forward(x, w, labels, inv_temp, return_entropy)
        ctx.save_for_backward(x, w, labels, lse, entropy if return_entropy else lse)
        ctx.inv_temp, ctx.return_entropy, ctx.chunk_size = inv_temp, return_entropy, chunk_size
        if not return_entropy:
            entropy = torch.zeros_like(logp)
            ctx.mark_non_differentiable(entropy)
        ctx.mark_non_differentiable(top1)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_top1):
        x, w, labels, lse, entropy = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        ge = grad_entropy.contiguous() if (ctx.return_entropy and grad_entropy is not None) else None
        dx, dw = _linear_backward(
            x, w, labels, lse, entropy, grad_logp.contiguous(), ge, ctx.inv_temp, ctx.chunk_size, need_dx, need_dw
        )
        return dx, dw, None, None, None, None


# ----------------------------------------------------------------------------- public ops


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    return_top1: bool = False,
    backend: str | None = None,
    validate: bool = True,
):
    """log softmax(logits / temperature)[labels], without an fp32 (N x V) buffer.

    Args:
        logits: (..., V) fp16/bf16/fp32 (fp64 on the torch backend).
        labels: (...) integer, in [0, V) or ``ignore_index``; already aligned with ``logits``.
        return_entropy: also return the per-token entropy of softmax(logits / temperature).
        return_top1: also return whether each label is the top-1 token (bool; ties count).
        backend: "auto" | "triton" | "torch" (default: ``AIHF_FAST_BACKEND`` or "auto").
        validate: check label range and finiteness (synchronises with the device).
    Returns:
        fp32 log-probs shaped like ``labels`` (0 at ignored positions, which get zero gradient);
        then, same shape, the fp32 entropy (``return_entropy``) and the bool top-1 flags
        (``return_top1``; False at ignored positions), in that order.
    """
    check_float("logits", logits)
    check_int("labels", labels)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dim, got a scalar")
    check_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device(logits=logits, labels=labels)
    temperature = _check_temperature(temperature)
    labels = labels.long()  # narrow integer dtypes would wrap ignore_index and the range check
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a vocabulary size V >= 1, got V = 0")
    if validate:
        check_labels(labels, V, ignore_index)
        check_finite("logits", logits)
    if _pick_backend(backend, logits, "logits") == "torch":
        return reference.token_logprobs(logits, labels, ignore_index, temperature, return_entropy, return_top1)
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    logp, entropy = _TokenLogprobsFunction.apply(
        logits2d, labels.reshape(-1).contiguous(), int(ignore_index), 1.0 / temperature, return_entropy
    )
    top1 = None
    if return_top1:
        with torch.no_grad():
            y = labels.reshape(-1)
            valid = y != ignore_index
            target = logits2d.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
            top1 = valid & (target >= logits2d.amax(1))
    return _outputs(labels.shape, logp, entropy if return_entropy else None, top1)


def _outputs(shape, logp, entropy, top1):
    """logp alone, or (logp, [entropy], [top1]) with those asked for, shaped like the labels."""
    out = [t.view(shape) for t in (logp, entropy, top1) if t is not None]
    return out[0] if len(out) == 1 else tuple(out)


def _check_linear_inputs(hidden, weight, labels, ignore_index, temperature, chunk_size, validate) -> float:
    """``linear_token_logprobs``'s argument checks -> the temperature as a float."""
    check_float("hidden", hidden)
    check_float("weight", weight, ndim=2)
    check_int("labels", labels)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a hidden-size dim, got a scalar")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) to match hidden's last dim {H}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have V >= 1 rows, got 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    temperature = _check_temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if validate:
        check_labels(labels.long(), weight.shape[0], ignore_index)
        check_finite("hidden", hidden)
        check_finite("weight", weight)
    return temperature


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    return_top1: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
    validate: bool = True,
):
    """log softmax(hidden @ weight.T / temperature)[labels] without materialising the logits.

    Args:
        hidden: (..., H) last hidden states; weight: (V, H) LM-head weight, same dtype.
        labels: (...) integer, in [0, V) or ``ignore_index`` (those rows are dropped before any
            matmul; they give 0 and get zero gradient).
        chunk_size: vocabulary columns per backward recompute chunk (default: ``default_chunk_size``,
            a (tokens x chunk) buffer of 256 to 512 MiB growing with the tokens, or
            ``AIHF_FAST_CHUNK_BYTES``).
    Returns: fp32 log-probs shaped like ``labels``; then, as in ``token_logprobs``, the entropy
    (``return_entropy``) and the top-1 flags (``return_top1``).
    Gradients flow to ``hidden`` and ``weight``.
    """
    temperature = _check_linear_inputs(hidden, weight, labels, ignore_index, temperature, chunk_size, validate)
    labels = labels.long()
    chosen = _pick_backend(backend, hidden, "hidden")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    N = flat_y.numel()
    valid = flat_y != ignore_index
    idx = valid.nonzero().squeeze(1)
    compact = idx.numel() != N
    x = flat_h[idx] if compact else flat_h
    y = flat_y[idx] if compact else flat_y
    if chosen == "torch":
        out = reference.linear_token_logprobs(x, weight, y, ignore_index, temperature, return_entropy, return_top1)
        out = list(out) if isinstance(out, tuple) else [out]
        logp = out.pop(0)
        entropy = out.pop(0) if return_entropy else None
        top1 = out.pop(0) if return_top1 else None
    else:
        logp, entropy, top1 = _LinearTokenLogprobsFunction.apply(
            x, weight, y.contiguous(), 1.0 / temperature, return_entropy, chunk_size
        )
        entropy = entropy if return_entropy else None
        top1 = top1 if return_top1 else None
    if compact:
        zeros = torch.zeros(N, dtype=logp.dtype, device=hidden.device)
        logp = zeros.index_copy(0, idx, logp)
        entropy = zeros.index_copy(0, idx, entropy) if entropy is not None else None
        top1 = torch.zeros(N, dtype=torch.bool, device=hidden.device).index_copy(0, idx, top1) if top1 is not None \
            else None
    return _outputs(labels.shape, logp, entropy, top1)


# ----------------------------------------------------------------------------- gradients in the forward

# d(weight) is accumulated over token chunks in fp32 when that buffer is at most this large, else
# in the weight's own dtype (one rounding per chunk; at V = 128k, H = 4k an fp32 copy is 2 GiB)
FP32_DWEIGHT_MAX_BYTES = 256 << 20
# approximate mode (grad_skip_below): vocabulary columns per decision, on every backend (a
# multiple of the d(logits) kernel's tile, which it is on a GPU at V >= 2048)
GRAD_SKIP_TILE = 2048


def default_grad_chunk_tokens(vocab_size: int, element_size: int) -> int:
    """Tokens per chunk of the gradients-in-forward path: a (tokens x V) logits buffer of at most
    ``AIHF_FAST_GRAD_CHUNK_BYTES`` (default 640 MiB; with an fp32 d(weight) accumulator of at most
    256 MiB the transient memory stays under 1 GiB), at least 1."""
    raw = os.environ.get("AIHF_FAST_GRAD_CHUNK_BYTES", str(640 << 20))
    if not (raw.isdigit() and int(raw) > 0):
        raise ValueError(f"AIHF_FAST_GRAD_CHUNK_BYTES must be a positive number of bytes, got {raw!r}")
    return max(1, int(raw) // max(1, vocab_size * element_size))


def plan_group_chunks(seg: torch.Tensor, groups: torch.Tensor, max_tokens: int):
    """Token chunks that each hold whole groups of sequences, for ``linear_sequence_loss``.

    seg: (M,) int64 sequence of each token; groups: (S,) int64 group of each sequence, in
    [0, G) (sequences whose losses are coupled, e.g. the two sides of a comparison, share one).
    Groups are packed in order, greedily, into chunks of at most ``max_tokens`` tokens.
    Returns a list of chunks, each a slice of the token rows when the tokens are already in
    chunk order, else a (m,) int64 index tensor; None when one group alone has more than
    ``max_tokens`` tokens (one host sync)."""
    if seg.numel() == 0:
        return []
    g_tok = groups[seg]
    counts = torch.bincount(g_tok, minlength=int(groups.max()) + 1 if groups.numel() else 0).tolist()
    if max(counts) > max_tokens:
        return None
    chunk_of_group, chunk, rows = [], 0, 0
    for c in counts:
        if rows and rows + c > max_tokens:
            chunk, rows = chunk + 1, 0
        chunk_of_group.append(chunk)
        rows += c
    c_tok = torch.tensor(chunk_of_group, device=seg.device)[g_tok]
    sizes = torch.bincount(c_tok, minlength=chunk + 1).tolist()
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    if bool((c_tok[1:] >= c_tok[:-1]).all()):  # tokens already in chunk order: slices, no gather
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    order = torch.sort(c_tok, stable=True).indices
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _loss_and_coefficients(loss_of, seq_logps):
    """loss_of and d loss_of / d seq_logps at ``seq_logps`` (S,) fp32 -> (0-d detached, (S,);
    zeros where the loss does not depend)."""
    with torch.enable_grad():
        s = seq_logps.detach().requires_grad_()
        loss = loss_of(s)
        if not loss.requires_grad:
            return loss.detach(), torch.zeros_like(s)
        (g,) = torch.autograd.grad(loss, s, allow_unused=True)
    return loss.detach(), (torch.zeros_like(s) if g is None else g)


def _true_runs(flags: list) -> list:
    """[(start, end)] of the runs of True in ``flags``."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


class _LinearSequenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, seg, num_sequences, loss_of, chunks, inv_temp, return_entropy, return_top1,
                chunk_size, skip_below):
        # the inputs' own precision, as the two-pass op computes (autocast would make half-precision logits)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearSequenceLossFunction._forward(ctx, x, w, labels, seg, num_sequences, loss_of, chunks,
                                                        inv_temp, return_entropy, return_top1, chunk_size, skip_below)

    @staticmethod
    def _forward(ctx, x, w, labels, seg, num_sequences, loss_of, chunks, inv_temp, return_entropy, return_top1,
                 chunk_size, skip_below):
        ctx.set_materialize_grads(False)
        M, H = x.shape
        V = w.shape[0]
        dev = x.device
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp = torch.zeros(M, dtype=torch.float32, device=dev)
        lse = torch.zeros_like(logp)
        entropy = torch.zeros_like(logp) if return_entropy else None
        top1 = torch.zeros(M, dtype=torch.bool, device=dev) if return_top1 else None
        seq = torch.zeros(num_sequences, dtype=torch.float32, device=dev)
        dx = torch.zeros_like(x) if need_dx else None
        dw = acc = None
        if need_dw:
            dw = torch.zeros_like(w)
            fp32_acc = w.dtype != torch.float32 and len(chunks) > 1 and V * H * 4 <= FP32_DWEIGHT_MAX_BYTES
            acc = torch.zeros(V, H, dtype=torch.float32, device=dev) if fp32_acc else dw
        block = _dlogits_block(V)
        n_tiles = _cdiv(V, block)
        skipped = 0  # token x column products left out (approximate mode)
        loss = coef = None  # after the last chunk: the loss and its coefficients at the complete seq
        for rows in chunks:
            xc, yc, sc = x[rows], labels[rows], seg[rows]
            z = xc @ w.t()  # (m, V): this chunk's logits, the only ones alive
            lp, ls, ent = _triton_row_forward(z, yc, -1, inv_temp, return_entropy)
            logp[rows], lse[rows] = lp, ls
            if return_entropy:
                entropy[rows] = ent
            if return_top1:
                top1[rows] = z.gather(1, yc[:, None])[:, 0] >= z.amax(1)
            seq.index_add_(0, sc, lp)  # the chunk's sequences are now complete
            if not (need_dx or need_dw):
                continue
            loss, coef = _loss_and_coefficients(loss_of, seq)  # final for this chunk's groups
            g = coef[sc].contiguous()
            pmax = torch.empty(len(yc), n_tiles, dtype=torch.float32, device=dev) if skip_below > 0 else None
            _triton_dlogits_(z, z, yc, ls, g, None, None, -1, inv_temp, tile_pmax=pmax)  # z := d loss / d logits
            spans = [(0, V)]
            if skip_below > 0:  # approximate: vocabulary tiles where every probability is below the threshold
                active = pmax.amax(0) >= skip_below  # per kernel tile, then per skip tile of `per` of them
                active[torch.div(yc, block, rounding_mode="floor")] = True  # the labels' tiles: d = g (1 - p)
                per = max(1, GRAD_SKIP_TILE // block)
                active = torch.nn.functional.pad(active, (0, -n_tiles % per)).view(-1, per).any(1)
                tile = per * block
                spans = [(a * tile, min(b * tile, V)) for a, b in _true_runs(active.tolist())]
                skipped += len(yc) * (V - sum(b - a for a, b in spans))
            if need_dw:  # the left-out rows of d(weight) get nothing from this chunk
                for a, b in spans:
                    _accumulate_mm(acc[a:b], z[:, a:b].t(), xc)
            if need_dx:
                if spans == [(0, V)]:
                    dx[rows] = z @ w
                else:  # contiguous runs of kept tiles, slices of z and w (no gathered copies)
                    dxc = torch.zeros(len(yc), H, dtype=torch.float32, device=dev)
                    for a, b in spans:
                        _accumulate_mm(dxc, z[:, a:b], w[a:b])
                    dx[rows] = dxc.to(dx.dtype)
            del z
        if acc is not None and acc is not dw:
            dw.copy_(acc)
        del acc
        if loss is None:  # no chunk, or no gradient needed
            loss, coef = _loss_and_coefficients(loss_of, seq)
        # the per-token coefficients, for a backward that cannot use dx / dw (a second one)
        coef = coef[seg] if (need_dx or need_dw) else lse
        ctx.save_for_backward(x, w, labels, lse, coef)
        ctx.made = (dx, dw)  # handed to the first backward, which owns them from then on
        ctx.inv_temp, ctx.chunk_size = inv_temp, chunk_size
        skipped = torch.tensor(skipped / max(1, M * V), dtype=torch.float32, device=dev)
        ctx.mark_non_differentiable(*(t for t in (entropy, top1) if t is not None), skipped)
        return loss, logp, entropy, top1, skipped

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, grad_top1, grad_skipped):
        if torch.is_grad_enabled():  # create_graph=True: these gradients were made without a graph
            raise RuntimeError("double backward (create_graph=True) through aihf_loss's gradients-in-forward path is "
                               "not supported: pass grad_in_forward=False for gradients of gradients")
        x, w, labels, lse, coef = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return (None,) * 12
        made, ctx.made = ctx.made, None
        gx = gw = None
        if grad_loss is not None and made is not None:  # the gradients made in the forward: handed over,
            gx, gw = made  # scaled in place (loss scaling, accumulation) without a second buffer
            scale = float(grad_loss)  # a Python float: the product is formed in fp32, rounded once
            if scale != 1.0:
                for t in (gx, gw):
                    if t is not None:
                        t.mul_(scale)
        elif grad_loss is not None:  # a second backward (retain_graph): recompute them
            grad_logp = coef * grad_loss if grad_logp is None else grad_logp + coef * grad_loss
        if grad_logp is not None:  # the token log-probs were used elsewhere too
            rx, rw = _linear_backward(x, w, labels, lse, None, grad_logp.contiguous(), None, ctx.inv_temp,
                                      ctx.chunk_size, need_dx, need_dw)
            gx = rx if gx is None else (gx + rx if rx is not None else gx)
            gw = rw if gw is None else (gw + rw if rw is not None else gw)
        return (gx, gw) + (None,) * 10


def linear_sequence_loss(x, weight, labels, seg, num_sequences, loss_of, chunks, *, temperature=1.0,
                         return_entropy=False, return_top1=False, chunk_size=None, grad_skip_below=0.0):
    """A loss of per-sequence log-probs, loss_of(seq_logps), with the gradients of ``x`` and
    ``weight`` made in the forward: each chunk's logits are computed once, turned in place into
    their gradient, and projected to d(x) and d(weight), with no recompute in the backward (6MHV
    FLOPs, not 8MHV). Triton backend (CUDA, or ``TRITON_INTERPRET=1``); the caller checks inputs.

    x: (M, H) hidden states of the loss tokens only; weight: (V, H), same dtype; labels: (M,)
    int64 in [0, V); seg: (M,) int64 sequence of each token in [0, num_sequences);
    loss_of: (S,) fp32 -> 0-d fp32, a torch function that is a sum of parts each reading the
    log-probs of one chunk's sequences only (so a chunk's gradients are final once its sequences
    are complete); chunks: ``plan_group_chunks``'s plan. chunk_size: vocabulary columns of the
    recompute, used only if the token log-probs also get a gradient from elsewhere.
    grad_skip_below: approximate gradients (0: exact). Within each chunk, a tile of vocabulary
    columns (``GRAD_SKIP_TILE``, 2048, on every backend) whose softmax probabilities are all below this
    value for every token of the chunk, and that holds none of the chunk's labels, is left out of
    d(x) and d(weight) (those entries of d(logits) are -g p, with p below the threshold), as Cut
    Cross-Entropy's gradient filtering; deterministic (no atomics). The loss and log-probs stay
    exact.
    Returns (loss 0-d fp32, token log-probs (M,) fp32[, entropy (M,) fp32][, top-1 flags (M,)
    bool], skipped 0-d fp32: the share of token x vocabulary products left out); the loss and the
    log-probs carry gradients to x and weight.
    """
    if not (isinstance(grad_skip_below, (int, float)) and 0.0 <= grad_skip_below < 1.0):
        raise ValueError(f"grad_skip_below must be in [0, 1), got {grad_skip_below!r}")
    loss, logp, entropy, top1, skipped = _LinearSequenceLossFunction.apply(
        x, weight, labels, seg, num_sequences, loss_of, chunks, 1.0 / _check_temperature(temperature),
        return_entropy, return_top1, chunk_size, float(grad_skip_below))
    return ((loss, logp) + tuple(t for t, want in ((entropy, return_entropy), (top1, return_top1)) if want)
            + (skipped,))
