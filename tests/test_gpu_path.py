"""What a GPU run does differently, checked on the CPU as far as a CPU can show it: the
dtype `auto` picks, ..."""

import logging

import pytest
import torch

from sysattn_exp.models import auto_dtype, resolve_dtype


@pytest.mark.parametrize(
    "capability,want",
    [
        ((9, 0), torch.bfloat16),  # H100, H200
        ((8, 6), torch.bfloat16),  # A10, RTX 30xx
        ((8, 0), torch.bfloat16),  # A100
        ((7, 5), torch.float16),  # T4
        ((7, 0), torch.float16),  # V100
        ((6, 0), torch.float16),  # P100
    ],
)
def test_auto_dtype_is_bfloat16_from_compute_capability_8(capability, want):
    dtype, why = auto_dtype(torch.device("cuda:0"), capability)
    assert dtype == want
    assert f"{capability[0]}.{capability[1]}" in why


def test_auto_dtype_is_float32_off_cuda(caplog):
    assert auto_dtype(torch.device("cpu"), None) == (torch.float32, "cpu device")
    with caplog.at_level(logging.INFO, logger="sysattn_exp.models"):
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert "model.dtype=auto: float32 (cpu device)" in caplog.messages
