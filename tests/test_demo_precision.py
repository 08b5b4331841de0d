"""The demo's mixed precision (llava_tune/demo/precision.py): bf16 only where it is native."""

from __future__ import annotations

import pytest
import torch

from llava_tune.demo.precision import demo_precision


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "no")])
def test_bf16_only_on_cpus_that_multiply_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert demo_precision() == expected


def test_a_torch_without_the_probes_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert demo_precision() == "no"


def test_a_gpu_leaves_it_to_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo_precision() == "auto"
