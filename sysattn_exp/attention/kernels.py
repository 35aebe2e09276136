"""Attention with its log-sum-exp: a fused kernel where one is known to be right, the
float32 math path otherwise.

The fused implementation (fused.py) needs, per modality span, the attention output and
the log-sum-exp (LSE) of the scores. The math path materialises the span's scores in
float32; fused kernels that return the LSE avoid that. Each device type has a list of
candidate kernels (KERNELS); a call goes to the first candidate that supports it (dtype,
head dim, no mask unless the kernel takes one, causal only when square) and that has
passed its first-use check, else to the math path.

The first-use check. These kernels cannot be run by the CPU test suite (CUDA), and their
private signatures and LSE conventions change between torch versions. So the first time
a kernel would be used for a kind of call (per process; the kind is everything that
selects different code inside a kernel: device, dtype, causal or not, head dim, masked or
not), it runs on a small slice of the real inputs beside the math path; if the two differ
beyond bf16 tolerance (or the kernel fails) it is not used again for that kind of call,
and one warning line says so. Later calls reuse the verdict without checking again. (A
slice in which no row sees a key, all left padding, decides nothing: that call takes the
math path.) Running out of memory is no verdict: it is raised as OutOfMemory (one line,
with the hint to lower model.batch_size) and leaves the kernel choice as it was; a
fallback to the math path, which materialises the scores, would only need more memory.

Which paths computed a job's attention (kernel names, "math", and "eager" for the eager
implementation) is recorded per thread while record_paths() is active: the runner's
`kernel_path` metric. planned_path() is what the candidate lists give for a device,
dtype and head dim before anything runs: the score cache's condition.

Tolerance, with u = 2^-8 the unit roundoff of bfloat16 and checked where the math path's
row sees some key:
- output: |o_kernel - o_math| <= 4 u max|V|. A bf16 kernel rounds its output (<= u |o|)
  and the probabilities it multiplies V by (<= u sum p |v| <= u max|V|); 4 u leaves a
  factor 2 of headroom. It is scale-aware through max|V| (o is a convex mix of V rows).
- LSE: |lse_kernel - lse_math| <= 4 u max(1, max|lse_math|). Kernels accumulate scores in
  float32, so they are far closer; 4 u of the scores' scale is what rounding the scores
  to bf16 would cost, and it still catches a wrong base (log2), scale or causal
  alignment, which are off by a fraction of |lse| or O(1).
A wrong kernel (layout, padding, masking) is off by O(max|V|) or O(1) in the LSE, far
beyond both bounds; a right one is within a fraction of them (the CPU flash kernel in
bf16: output 0.6 u max|V|, LSE 1e-6 |lse|).
"""

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sysattn_exp.errors import UsageError, first_line

log = logging.getLogger(__name__)

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
TOLERANCE = 4 * BF16_UNIT
# The first-use check runs on at most this many query rows, heads and sequences (the
# first ones), and every key of the span (causal: the square block).
CHECK_ROWS, CHECK_HEADS, CHECK_SEQUENCES = 64, 4, 2

HALF = frozenset({torch.float16, torch.bfloat16})
aten = torch.ops.aten


@dataclass(frozen=True)
class Kernel:
    """A fused attention kernel that returns the LSE, and the inputs it accepts.
    `run(query, key, value, bias, scaling, is_causal)` -> (out (B, H, Q, D), lse (B, H, Q))."""

    name: str
    run: Callable
    dtypes: frozenset
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    accepts_mask: bool = False

    def accepts(self, dtype: torch.dtype, head_dim: int, masked: bool) -> bool:
        return (
            dtype in self.dtypes
            and (self.max_head_dim is None or head_dim <= self.max_head_dim)
            and head_dim % self.head_dim_multiple == 0
            and (not masked or self.accepts_mask)
        )

    def supports(self, query, key, value, mask, is_causal: bool) -> bool:
        head_dim = query.shape[-1]
        return (
            self.accepts(query.dtype, head_dim, mask is not None)
            and key.dtype == value.dtype == query.dtype
            and key.shape[-1] == value.shape[-1] == head_dim
            # The math path's causal mask is top-left, flash's is bottom-right when Q != K:
            # they agree on square blocks, the only causal calls fused.py makes.
            and (not is_causal or query.shape[2] == key.shape[2])
            and query.shape[2] > 0
            and key.shape[2] > 0
        )


def cuda_flash(query, key, value, bias, scaling, is_causal):
    # -> (output, logsumexp (B, H, Q) float32, cum_seq_q, cum_seq_k, max_q, max_k,
    #     rng_state, unused, debug_attn_mask)
    out = aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, is_causal, False, scale=scaling
    )
    return out[0], out[1]


def cuda_efficient(query, key, value, bias, scaling, is_causal):
    # -> (output, log_sumexp (B, H, ceil(Q / 32) * 32) float32, philox_seed, philox_offset)
    out, lse = aten._scaled_dot_product_efficient_attention(
        query, key, value, None, True, 0.0, is_causal, scale=scaling
    )[:2]
    return out, lse[:, :, : query.shape[2]]  # the LSE is padded along the queries


def cpu_flash(query, key, value, bias, scaling, is_causal):
    # -> (output, logsumexp (B, H, Q) in float32 for bf16 / fp16 inputs)
    return aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=bias, scale=scaling
    )


# Candidates per device type, first match wins. CUDA: flash (sm80+; fp16/bf16; head dim
# <= 256), then memory-efficient (sm50+; head dim a multiple of 8 for half types). Neither
# takes a mask here (flash cannot; masked spans are rare: left padding) and neither runs
# float32: a float32 run keeps the exact math path. CPU: the flash kernel, which takes the
# mask as an additive bias.
KERNELS: dict[str, list[Kernel]] = {
    "cuda": [
        Kernel("cuda_flash", cuda_flash, HALF, max_head_dim=256, head_dim_multiple=8),
        Kernel("cuda_efficient", cuda_efficient, HALF, head_dim_multiple=8),
    ],
    "cpu": [
        Kernel(
            "cpu_flash",
            cpu_flash,
            frozenset({torch.float32, torch.bfloat16, torch.float16}),
            accepts_mask=True,
        )
    ],
}

MATH = "math"  # the float32 math path's name in kernel paths

# (device, dtype, kernel name, causal, head dim, masked) -> whether that kernel is used for
# such calls: set by its first-use check.
_verdicts: dict[tuple, bool] = {}


class OutOfMemory(UsageError):
    """The attention of a batch did not fit in memory (one line, with what to lower)."""


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "can't allocate memory")
    )


def attention_with_lse(query, key, value, mask, scaling, is_causal: bool):
    """Attention output (B, H, Q, D) and log-sum-exp of the scores (B, H, Q). `mask`: None
    or a boolean (B|1, 1, Q, K) mask of visible keys; `is_causal`: top-left causal. Raises
    OutOfMemory (a UsageError: lower model.batch_size) where the memory runs out."""
    try:
        return dispatch(query, key, value, mask, scaling, is_causal)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        batch, heads, rows, _ = query.shape
        raise OutOfMemory(
            f"out of memory in attention on {query.device} {dtype_name(query.dtype)} ({batch} "
            f"sequences x {heads} heads x {rows} query rows x {key.shape[2]} keys): lower "
            f"model.batch_size ({first_line(error)})"
        ) from error


def dispatch(query, key, value, mask, scaling, is_causal: bool):
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, -math.inf
        )
    args = (query, key, value, bias, scaling, is_causal)
    for kernel in KERNELS.get(query.device.type, ()):
        if not kernel.supports(query, key, value, mask, is_causal):
            continue
        where = call_kind(kernel, query, mask, is_causal)
        if where not in _verdicts:
            verdict = first_use_check(kernel, where, *args)
            if verdict is None:  # nothing to compare yet: this call takes the math path
                break
            _verdicts[where] = verdict
        if _verdicts[where]:
            try:
                out = kernel.run(*args)
            except Exception as error:  # inputs the check did not see: stop using it
                if is_out_of_memory(error):
                    raise  # a smaller batch fits: no verdict
                _verdicts[where] = False
                warn(kernel, where, f"failed ({first_line(error)})")
                continue
            note_path(kernel.name)
            return out
    note_path(MATH)
    return attention_with_lse_math(*args)


def attention_with_lse_math(query, key, value, bias, scaling, is_causal: bool = False):
    """The portable path: the scores materialised in float32; a row that sees no key gets
    output 0 and LSE -inf."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if bias is not None:
        scores = scores + bias.float()
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    lse = scores.logsumexp(-1)
    weights = (scores - lse[..., None]).exp().nan_to_num(0.0)
    return torch.matmul(weights, value.float()), lse


def call_kind(kernel: Kernel, query, mask, is_causal: bool) -> tuple:
    """What a verdict is kept for: everything that changes a kernel's behaviour (device,
    dtype, the kernel, causal or not, head dim, masked or not)."""
    return (
        str(query.device),
        query.dtype,
        kernel.name,
        is_causal,
        query.shape[-1],
        mask is not None,
    )


def first_use_check(
    kernel: Kernel, where: tuple, query, key, value, bias, scaling, is_causal
) -> bool | None:
    """Whether `kernel` agrees with the math path on a slice of these inputs (if not, one
    warning line); None if no row of the slice sees a key (left padding): undecided."""
    n = min(query.shape[2], CHECK_ROWS)
    q, k, v = (t[:CHECK_SEQUENCES, :CHECK_HEADS] for t in (query, key, value))
    q = q[:, :, :n]
    if is_causal:  # the square top-left block: row i sees keys 0..i
        k, v = k[:, :, :n], v[:, :, :n]
    b = None if bias is None else bias[:CHECK_SEQUENCES, :CHECK_HEADS, :n, : k.shape[2]]
    want = attention_with_lse_math(q, k, v, b, scaling, is_causal)
    if not torch.isfinite(want[1]).any():
        return None
    try:
        got = kernel.run(q, k, v, b, scaling, is_causal)
    except Exception as error:  # e.g. a signature that changed, a build without it
        if is_out_of_memory(error):
            raise  # no verdict: attention_with_lse says to lower the batch size
        warn(kernel, where, f"failed ({first_line(error)})")
        return False
    problem = disagreement(got, want, v)
    if problem:
        warn(kernel, where, f"differs from the math path ({problem})")
    return not problem


def disagreement(got, want, value) -> str | None:
    """What is wrong with a kernel's (out, lse) against the math path's, or None."""
    (out, lse), (out_math, lse_math) = got, want
    if out.shape != out_math.shape or lse.shape != lse_math.shape:
        return f"shapes {tuple(out.shape)}, {tuple(lse.shape)}"
    seen = torch.isfinite(lse_math)  # rows that see no key: kernels may give NaN there
    out, out_math = out.float()[seen], out_math[seen]
    lse, lse_math = lse.float()[seen], lse_math[seen]
    if len(lse) == 0:
        return None
    out_error = (out - out_math).abs().max().nan_to_num(math.inf).item()
    out_bound = TOLERANCE * value.float().abs().max().item()
    lse_error = (lse - lse_math).abs().max().nan_to_num(math.inf).item()
    lse_bound = TOLERANCE * max(1.0, lse_math.abs().max().item())
    if out_error <= out_bound and lse_error <= lse_bound:
        return None
    return (
        f"output error {out_error:.3g}, bound {out_bound:.3g}; "
        f"LSE error {lse_error:.3g}, bound {lse_bound:.3g}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def warn(kernel: Kernel, where: tuple, what: str) -> None:
    log.warning(
        "attention kernel %s %s on %s: not used there again in this process (the next "
        "candidate kernel or the float32 math path is)",
        kernel.name,
        what,
        describe_kind(where),
    )


def describe_kind(where: tuple) -> str:
    """A verdict's key as words: 'cuda:0 bfloat16 (causal, head dim 128)'."""
    device, dtype, _, causal, head_dim, masked = where
    kind = f"{'causal' if causal else 'full'}, head dim {head_dim}" + (", masked" if masked else "")
    return f"{device} {dtype_name(dtype)} ({kind})"


def planned_path(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The paths the candidate lists give for this device, dtype and head dim, masked and
    unmasked calls together (e.g. "cuda_flash+math": CUDA kernels take no mask). It ignores
    first-use verdicts, so that it is the same before and after a job and in every process
    of one environment; a kernel rejected by its check shows in the job's kernel_path."""
    paths = set()
    for masked in (False, True):
        kernel = next(
            (k for k in KERNELS.get(device.type, ()) if k.accepts(dtype, head_dim, masked)), None
        )
        paths.add(MATH if kernel is None else kernel.name)
    return path_label(paths)


# Paths that are not kernels: the fused implementation's materialised rows and its biased
# SDPA call (fused.PATHS, chosen by shape), the float32 math path and the eager
# implementation; kernel_path lists them last.
NOT_KERNELS = ("bias", "rows", MATH, "eager")


def path_label(paths) -> str:
    """Kernel names (sorted), then "bias", "rows", "math" and "eager", joined by "+"; "sdpa" when
    none ran (every attention call was plain SDPA: the unchanged model)."""
    last = [name for name in NOT_KERNELS if name in paths]
    return "+".join(sorted(set(paths) - set(NOT_KERNELS)) + last) or "sdpa"


_usage = threading.local()  # .recorders: the sets record_paths() gave out, in this thread


def note_path(name: str) -> None:
    """Record that `name` (a kernel, "bias", "rows", "math" or "eager") computed some
    attention."""
    for paths in getattr(_usage, "recorders", ()):
        paths.add(name)


@contextmanager
def record_paths() -> Iterator[set[str]]:
    """The set of paths that compute attention in this thread while the block runs."""
    if not hasattr(_usage, "recorders"):
        _usage.recorders = []
    paths: set[str] = set()
    _usage.recorders.append(paths)
    try:
        yield paths
    finally:
        # by identity: an outer recorder may hold the same names
        _usage.recorders[:] = [r for r in _usage.recorders if r is not paths]


def verdicts() -> list[str]:
    """The first-use verdicts of this process, one line each (no commas: MLflow params
    join lists with them), e.g. "cuda_flash cuda:0 bfloat16 causal head_dim=128: used"."""
    lines = []
    for (device, dtype, name, causal, head_dim, masked), used in sorted(_verdicts.items(), key=str):
        kind = f"{'causal' if causal else 'full'} head_dim={head_dim}{' masked' * masked}"
        lines.append(
            f"{name} {device} {dtype_name(dtype)} {kind}: {'used' if used else 'rejected'}"
        )
    return lines
