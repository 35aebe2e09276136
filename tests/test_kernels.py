"""Kernel dispatch and its first-use check (sysattn_exp/attention/kernels.py), on CPU: the CPU
candidate list is replaced by kernels made to agree, disagree, fail or run out of memory."""

import logging
import math

import pytest
import torch

from sysattn_exp.attention import kernels
from sysattn_exp.attention.kernels import (
    BF16_UNIT,
    Kernel,
    attention_with_lse,
    attention_with_lse_math,
    disagreement,
)

ALL = frozenset({torch.float32, torch.bfloat16, torch.float16})


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(kernels, "_verdicts", {})


class Spy:
    """A kernel's run function that records the shape of every call."""

    def __init__(self, run):
        self.run, self.calls = run, []

    def __call__(self, query, key, value, bias, scaling, is_causal):
        self.calls.append(tuple(query.shape))
        return self.run(query, key, value, bias, scaling, is_causal)


def use_kernels(monkeypatch, *runs, dtypes=ALL, **limits) -> list[Spy]:
    """Make `runs` the CPU candidates, in order, as kernels k0, k1, ..."""
    spies = [Spy(run) for run in runs]
    candidates = [Kernel(f"k{i}", spy, dtypes, **limits) for i, spy in enumerate(spies)]
    monkeypatch.setitem(kernels.KERNELS, "cpu", candidates)
    return spies


def inputs(seed, batch=2, heads=4, q_len=9, k_len=None, head_dim=16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    k_len = q_len if k_len is None else k_len
    shapes = [(batch, heads, q_len, head_dim)] + [(batch, heads, k_len, head_dim)] * 2
    return [torch.randn(*s, generator=generator).mul(2).to(dtype) for s in shapes]


def math_path(q, k, v, mask, scaling, is_causal):
    bias = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    return attention_with_lse_math(q, k, v, bias, scaling, is_causal)


def kernel_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sysattn_exp.attention.kernels"]


CALLS = [  # (seed, causal, q_len, k_len, batch): the first is the first use
    (0, True, 9, 9, 2),
    (1, False, 5, 12, 3),
    (2, True, 70, 70, 1),
    (3, False, 1, 30, 2),
]


def scaled_output(q, k, v, bias, scaling, is_causal):
    out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
    return out * 1.05, lse


def lse_base_two(q, k, v, bias, scaling, is_causal):
    out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
    return out, lse / math.log(2)


def lse_padded(q, k, v, bias, scaling, is_causal):  # the efficient kernel's LSE, unsliced
    out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
    padded = -(-q.shape[2] // 32) * 32
    return out, torch.nn.functional.pad(lse, (0, padded - q.shape[2]))


def swapped_causal(q, k, v, bias, scaling, is_causal):
    return kernels.cpu_flash(q, k, v, bias, scaling, not is_causal)


def raises(q, k, v, bias, scaling, is_causal):
    raise RuntimeError("no kernel image is available for execution on the device\nmore")


@pytest.mark.parametrize(
    "bad",
    [scaled_output, lse_base_two, lse_padded, swapped_causal, raises],
    ids=lambda f: f.__name__,
)
def test_a_disagreeing_kernel_falls_back_once_with_one_warning(monkeypatch, caplog, bad):
    (spy,) = use_kernels(monkeypatch, bad)
    caplog.set_level(logging.WARNING)
    with kernels.record_paths() as paths:
        for seed, causal, q_len, k_len, batch in CALLS:
            q, k, v = inputs(seed, batch, q_len=q_len, k_len=k_len)
            got = attention_with_lse(q, k, v, None, 0.3, causal)
            want = math_path(q, k, v, None, 0.3, causal)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(spy.calls) == 2, "checked once per kind of call (causal, full), never used"
    assert all(c[:2] == (2, 4) and c[2] <= kernels.CHECK_ROWS for c in spy.calls)
    causal, full = kernel_warnings(caplog)
    for message in (causal, full):
        assert "k0" in message and "cpu float32" in message and "\n" not in message
    assert "(causal, head dim 16)" in causal and "(full, head dim 16)" in full
    assert kernels.path_label(paths) == "math"


def test_an_agreeing_kernel_is_checked_once_then_used(monkeypatch, caplog):
    (spy,) = use_kernels(monkeypatch, kernels.cpu_flash)
    caplog.set_level(logging.WARNING)
    with kernels.record_paths() as paths:
        for seed, causal, q_len, k_len, batch in CALLS:
            q, k, v = inputs(seed, batch, q_len=q_len, k_len=k_len)
            got = attention_with_lse(q, k, v, None, 0.3, causal)
            want = kernels.cpu_flash(q, k, v, None, 0.3, causal)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            exact = math_path(q, k, v, None, 0.3, causal)
            assert torch.allclose(got[0], exact[0], atol=1e-5)
            assert torch.allclose(got[1], exact[1])
    checks = [spy.calls[0], spy.calls[2]]  # the first causal and the first full call
    assert checks == [(2, 4, 9, 16), (2, 4, 5, 16)]
    assert [spy.calls[1], *spy.calls[3:]] == [(b, 4, n, 16) for _, _, n, _, b in CALLS]
    assert kernel_warnings(caplog) == [] and paths == {"k0"}


def test_a_kernel_that_fails_later_is_dropped_with_one_warning(monkeypatch, caplog):
    """The check runs on two sequences; a kernel that cannot take three fails on use."""

    def two_sequences_at_most(q, k, v, bias, scaling, is_causal):
        if q.shape[0] > 2:
            raise RuntimeError("batch too large")
        return kernels.cpu_flash(q, k, v, bias, scaling, is_causal)

    (spy,) = use_kernels(monkeypatch, two_sequences_at_most)
    caplog.set_level(logging.WARNING)
    for seed in range(3):
        q, k, v = inputs(seed, batch=3)
        got = attention_with_lse(q, k, v, None, 0.3, True)
        want = math_path(q, k, v, None, 0.3, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert [shape[0] for shape in spy.calls] == [2, 3], "checked, tried once, then dropped"
    (message,) = kernel_warnings(caplog)
    assert "failed (batch too large)" in message


def test_the_next_candidate_serves_after_a_fallback(monkeypatch, caplog):
    bad, good = use_kernels(monkeypatch, scaled_output, kernels.cpu_flash)
    caplog.set_level(logging.WARNING)
    for seed in range(3):
        q, k, v = inputs(seed)
        got = attention_with_lse(q, k, v, None, 0.3, False)
        assert torch.equal(got[0], kernels.cpu_flash(q, k, v, None, 0.3, False)[0])
    assert len(bad.calls) == 1 and len(good.calls) == 1 + 3
    assert len(kernel_warnings(caplog)) == 1


def test_one_verdict_per_device_and_dtype(monkeypatch, caplog):
    """A kernel wrong in bfloat16 only: float32 keeps it, bfloat16 falls back; each dtype
    is checked once (the key: device, dtype, kernel, causal, head dim, masked)."""

    def wrong_in_bf16(q, k, v, bias, scaling, is_causal):
        out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
        return (out * 1.1 if q.dtype == torch.bfloat16 else out), lse

    (spy,) = use_kernels(monkeypatch, wrong_in_bf16)
    caplog.set_level(logging.WARNING)
    for seed in range(2):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = inputs(seed, dtype=dtype)
            attention_with_lse(q, k, v, None, 0.3, False)
    assert len(spy.calls) == 2 + 2  # a check per dtype, float32 used twice
    assert kernels._verdicts == {
        ("cpu", torch.float32, "k0", False, 16, False): True,
        ("cpu", torch.bfloat16, "k0", False, 16, False): False,
    }
    (message,) = kernel_warnings(caplog)
    assert "cpu bfloat16" in message


def test_a_slice_that_sees_no_key_decides_nothing(monkeypatch, caplog):
    """Left padding: the first sequences' first rows see no key. That call takes the math
    path and the next one is checked."""
    (spy,) = use_kernels(monkeypatch, kernels.cpu_flash, accepts_mask=True)
    caplog.set_level(logging.WARNING)
    q, k, v = inputs(0, batch=3)
    mask = torch.ones(3, 1, 9, 9, dtype=torch.bool)
    mask[:2] = False
    got = attention_with_lse(q, k, v, mask, 0.3, False)
    want = math_path(q, k, v, mask, 0.3, False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert spy.calls == [] and kernels._verdicts == {}
    attention_with_lse(q, k, v, torch.ones_like(mask), 0.3, False)
    assert len(spy.calls) == 2
    assert kernels._verdicts == {("cpu", torch.float32, "k0", False, 16, True): True}
    assert kernel_warnings(caplog) == []


def must_not_run(q, k, v, bias, scaling, is_causal):
    raise AssertionError("this call must go to the math path")


MATH_CASES = {  # kernel spec, and the call it does not support
    "mask": ({}, {"mask": True}),
    "dtype": ({"dtypes": frozenset({torch.bfloat16})}, {}),
    "head dim too large": ({"max_head_dim": 8}, {}),
    "head dim not a multiple": ({"head_dim_multiple": 32}, {}),
    "causal, not square": ({}, {"causal": True, "k_len": 12}),
    "no keys": ({}, {"k_len": 0}),
}


@pytest.mark.parametrize("case", MATH_CASES, ids=list(MATH_CASES))
def test_unsupported_calls_take_the_math_path(monkeypatch, caplog, case):
    spec, call = MATH_CASES[case]
    (spy,) = use_kernels(monkeypatch, must_not_run, **spec)
    caplog.set_level(logging.WARNING)
    q, k, v = inputs(0, k_len=call.get("k_len", 9))
    mask = None
    if call.get("mask"):
        mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0)) > 0.3
        mask[:, :, 0] = False  # a row that sees no key
    causal = call.get("causal", False)
    got = attention_with_lse(q, k, v, mask, 0.3, causal)
    want = math_path(q, k, v, mask, 0.3, causal)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert spy.calls == [] and kernel_warnings(caplog) == [] and kernels._verdicts == {}


def test_the_cpu_kernel_passes_its_check_masked_or_not(caplog):
    """The real CPU entry, in float32 and bfloat16, with a mask and rows that see no key."""
    caplog.set_level(logging.WARNING)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = inputs(5, q_len=40, k_len=70, head_dim=32, dtype=dtype)
        mask = torch.rand(2, 1, 40, 70, generator=torch.Generator().manual_seed(1)) > 0.5
        mask[:, :, :3] = False
        out, lse = attention_with_lse(q, k, v, mask, 32**-0.5, False)
        assert kernels._verdicts[("cpu", dtype, "cpu_flash", False, 32, True)] is True
        seen = mask.any(-1).expand(2, 4, 40)
        want_out, want_lse = math_path(q, k, v, mask, 32**-0.5, False)
        scale = v.float().abs().max()
        assert (out.float() - want_out)[seen].abs().max() <= kernels.TOLERANCE * scale
        assert (lse - want_lse)[seen].abs().max() <= 1e-4
    assert kernel_warnings(caplog) == []


def test_the_tolerance_is_four_bf16_units_of_the_scale():
    q, k, v = inputs(3, q_len=6, k_len=10)
    v = v * 7  # max|V| sets the output's scale
    out, lse = math_path(q, k, v, None, 0.3, False)
    unit_out = BF16_UNIT * v.abs().max()
    unit_lse = BF16_UNIT * max(1.0, lse.abs().max().item())
    assert disagreement((out + 3.9 * unit_out, lse), (out, lse), v) is None
    assert disagreement((out + 4.1 * unit_out, lse), (out, lse), v) is not None
    assert disagreement((out, lse - 3.9 * unit_lse), (out, lse), v) is None
    assert disagreement((out, lse - 4.1 * unit_lse), (out, lse), v) is not None
    nan_row = out.clone()
    nan_row[0, 0, 0, 0] = math.nan
    assert disagreement((nan_row, lse), (out, lse), v) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("run", [kernels.cuda_flash, kernels.cuda_efficient])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_wrappers_bind_to_the_ops_and_return_lse_per_query(run, dtype, causal):
    """Meta tensors run the real ops' schemas and shape rules (the memory-efficient
    kernel's LSE is padded to a multiple of 32 queries) without a GPU."""
    q_len = 40 if causal else 5
    q = torch.empty(2, 3, q_len, 128, device="meta", dtype=dtype)
    k = torch.empty(2, 3, 40, 128, device="meta", dtype=dtype)
    out, lse = run(q, k, k, None, 0.125, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 3, q_len) and lse.dtype == torch.float32


def test_cuda_candidates_take_llava_spans_and_leave_the_rest_to_math():
    flash, efficient = kernels.KERNELS["cuda"]
    bf16 = inputs(0, head_dim=128, dtype=torch.bfloat16)
    assert flash.supports(*bf16, None, True) and efficient.supports(*bf16, None, False)
    fp32 = inputs(0, head_dim=128)
    assert not flash.supports(*fp32, None, False) and not efficient.supports(*fp32, None, False)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    assert not flash.supports(*bf16, mask, False) and not efficient.supports(*bf16, mask, False)
    wide = inputs(0, head_dim=264, dtype=torch.bfloat16)
    assert not flash.supports(*wide, None, False) and efficient.supports(*wide, None, False)
    odd = inputs(0, head_dim=20, dtype=torch.bfloat16)
    assert not flash.supports(*odd, None, False) and not efficient.supports(*odd, None, False)


KINDS = {  # a kernel wrong for one kind of call only: (wrong when, the call that is it)
    "causal": (lambda q, causal, bias: causal, {"causal": True}),
    "head dim 32": (lambda q, causal, bias: q.shape[-1] == 32, {"head_dim": 32}),
    "masked": (lambda q, causal, bias: bias is not None, {"mask": True}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_verdict_covers_only_its_kind_of_call(monkeypatch, caplog, kind):
    """A kernel wrong only for causal calls (or head dim 32, or masked calls) is rejected
    there and still serves the other kind, each kind checked once."""
    wrong_when, call = KINDS[kind]

    def wrong_for_one_kind(q, k, v, bias, scaling, is_causal):
        out, lse = kernels.cpu_flash(q, k, v, bias, scaling, is_causal)
        return (out * 1.1 if wrong_when(q, is_causal, bias) else out), lse

    (spy,) = use_kernels(monkeypatch, wrong_for_one_kind, accepts_mask=True)
    caplog.set_level(logging.WARNING)
    odd = dict(q_len=9, head_dim=call.get("head_dim", 16))
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril() if call.get("mask") else None
    for _ in range(2):
        with kernels.record_paths() as plain_paths:
            q, k, v = inputs(0)
            got = attention_with_lse(q, k, v, None, 0.3, False)
        assert torch.equal(got[0], kernels.cpu_flash(q, k, v, None, 0.3, False)[0])
        with kernels.record_paths() as odd_paths:
            q, k, v = inputs(1, **odd)
            got = attention_with_lse(q, k, v, mask, 0.3, call.get("causal", False))
        want = math_path(q, k, v, mask, 0.3, call.get("causal", False))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert plain_paths == {"k0"} and odd_paths == {"math"}
    assert len(spy.calls) == 1 + 2 + 1, "plain: checked, used twice; the odd kind checked once"
    assert sorted(kernels._verdicts.values()) == [False, True]
    (message,) = kernel_warnings(caplog)
    assert "k0 differs" in message


def out_of_memory(q, k, v, bias, scaling, is_causal):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")


def out_of_memory_text(q, k, v, bias, scaling, is_causal):  # a RuntimeError, older builds
    raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported")


@pytest.mark.parametrize("oom", [out_of_memory, out_of_memory_text], ids=lambda f: f.__name__)
def test_out_of_memory_in_the_check_is_raised_and_decides_nothing(monkeypatch, caplog, oom):
    """Out of memory at the first-use check: one line saying to lower model.batch_size,
    no verdict, no warning; the next call is checked again and uses the kernel."""
    (spy,) = use_kernels(monkeypatch, oom)
    caplog.set_level(logging.WARNING)
    q, k, v = inputs(0)
    with pytest.raises(kernels.OutOfMemory) as raised:
        attention_with_lse(q, k, v, None, 0.3, True)
    message = str(raised.value)
    assert "lower model.batch_size" in message and "out of memory" in message
    assert "\n" not in message and "2 sequences x 4 heads x 9 query rows x 9 keys" in message
    assert kernels._verdicts == {} and kernel_warnings(caplog) == []
    spy.run = kernels.cpu_flash  # memory is free again
    with kernels.record_paths() as paths:
        got = attention_with_lse(q, k, v, None, 0.3, True)
    assert torch.equal(got[0], kernels.cpu_flash(q, k, v, None, 0.3, True)[0])
    assert paths == {"k0"} and list(kernels._verdicts.values()) == [True]


def test_out_of_memory_in_use_is_raised_and_keeps_the_kernel(monkeypatch, caplog):
    """A kernel that passed its check runs out of memory on a larger batch: OutOfMemory,
    and the verdict stays (no fallback to the math path, which needs more memory)."""

    def fits_two_sequences(q, k, v, bias, scaling, is_causal):
        if q.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return kernels.cpu_flash(q, k, v, bias, scaling, is_causal)

    (spy,) = use_kernels(monkeypatch, fits_two_sequences)
    caplog.set_level(logging.WARNING)
    q, k, v = inputs(0, batch=3)
    with pytest.raises(kernels.OutOfMemory, match="3 sequences .* lower model.batch_size"):
        attention_with_lse(q, k, v, None, 0.3, False)
    assert [c[0] for c in spy.calls] == [2, 3], "checked on two sequences, then run on three"
    assert list(kernels._verdicts.values()) == [True] and kernel_warnings(caplog) == []
    q, k, v = inputs(1, batch=2)
    attention_with_lse(q, k, v, None, 0.3, False)
    assert len(spy.calls) == 3, "the kernel still serves"


def test_out_of_memory_is_a_usage_error():
    """OutOfMemory is a UsageError: what the runner's entry point prints as one line,
    exiting with 2 (that path: tests/test_cli_bad_input.py)."""
    from sysattn_exp.errors import UsageError

    assert issubclass(kernels.OutOfMemory, UsageError)


def test_planned_path_names_what_the_candidates_give():
    """planned_path: per device, dtype and head dim, the kernel for unmasked calls and the
    one (or the math path) for masked calls; verdicts do not change it."""
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert kernels.planned_path(cuda, torch.bfloat16, 128) == "cuda_flash+math"
    assert kernels.planned_path(cuda, torch.float16, 264) == "cuda_efficient+math"
    assert kernels.planned_path(cuda, torch.float32, 128) == "math"
    assert kernels.planned_path(cuda, torch.bfloat16, 20) == "math"
    assert kernels.planned_path(cpu, torch.float32, 16) == "cpu_flash"
    kernels._verdicts[("cpu", torch.float32, "cpu_flash", False, 16, False)] = False
    assert kernels.planned_path(cpu, torch.float32, 16) == "cpu_flash"
    assert kernels.path_label({"math", "eager", "cuda_flash"}) == "cuda_flash+math+eager"
    assert kernels.path_label(set()) == "sdpa"


def test_verdicts_are_listed_in_words(monkeypatch):
    use_kernels(monkeypatch, kernels.cpu_flash, accepts_mask=True)
    q, k, v = inputs(0, dtype=torch.bfloat16)
    attention_with_lse(q, k, v, None, 0.3, True)
    q, k, v = inputs(0, head_dim=32)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    attention_with_lse(q, k, v, mask, 0.3, False)
    assert kernels.verdicts() == [
        "k0 cpu bfloat16 causal head_dim=16: used",
        "k0 cpu float32 full head_dim=32 masked: used",
    ]
