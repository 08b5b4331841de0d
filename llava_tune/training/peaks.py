"""What a GPU can do: its peak dense TFLOP/s, from a table of the GPUs people train on or from
`train.peak_tflops`, the denominator of MFU (model FLOPs utilization).

The table holds datasheet figures: tensor cores, bf16 inputs with fp32 accumulation (what
torch's bf16 matmuls use), dense (not the doubled 2:4-sparsity figures datasheets print
first), at boost clock. GPUs without bf16 (V100, T4) train in fp16 (train.mixed_precision=auto),
so theirs is the fp16 figure. GeForce cards print two figures; theirs is the one with fp32
accumulation (the RTX 4090's 165 TFLOP/s, not the 330 with fp16 accumulation). A GPU missing
from the table (A10G, whose figure NVIDIA does not publish, among others) gets no MFU unless
`train.peak_tflops` gives its peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    # (pattern in torch.cuda.get_device_name, lowercased; the first that matches wins), TFLOP/s
    (r"h100.*pcie", 756.0),        # H100 PCIe: 1,513 with sparsity
    (r"h100.*nvl", 835.5),         # H100 NVL: 1,671 with sparsity
    (r"h100|h800", 989.4),         # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"h200.*nvl", 835.5),         # H200 NVL
    (r"h200", 989.4),              # H200 SXM, GH200 (the same GPU as H100 SXM)
    (r"b200", 2250.0),             # HGX B200: 4.5 PFLOP/s with sparsity
    (r"a100|a800", 312.0),         # A100 SXM and PCIe, 40 and 80 GB
    (r"l40s", 362.05),
    (r"\bl40\b", 181.05),
    (r"\bl4\b", 121.0),
    (r"\ba10\b", 125.0),           # A10 (not A10G)
    (r"rtx 4090", 165.2),          # Ada whitepaper, bf16 with fp32 accumulate
    (r"rtx 3090", 71.0),           # GA102 whitepaper, fp16/bf16 with fp32 accumulate
    (r"rtx 6000 ada", 364.25),
    (r"rtx a6000", 154.8),
    (r"v100s", 130.0),             # fp16: V100 has no bf16
    (r"v100.*pcie", 112.0),
    (r"v100", 125.0),              # V100 SXM2
    (r"\bt4\b", 65.0),             # fp16
    (r"mi300x", 1307.4),           # AMD Instinct MI300X
    (r"mi250x", 383.0),
    (r"mi250\b", 362.1),
)


def table_peak(device_name: str) -> float | None:
    """The table's peak TFLOP/s for a GPU of this name (torch.cuda.get_device_name), or None."""
    name = device_name.lower()
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


@dataclass(frozen=True)
class Peak:
    tflops: float
    """Per GPU (per process)."""
    source: str
    """Where the figure comes from, for the run's header."""


def find_peak(setting: float | None, device: torch.device, half_precision: bool) -> Peak | None:
    """`train.peak_tflops` when set, else the table's figure for this process's GPU when the
    run computes in bf16 or fp16 (the table's figures are for those: an fp32 run's would be
    far lower); None on the CPU or for a GPU the table lacks."""
    if setting is not None:
        return Peak(setting, "train.peak_tflops")
    if device.type != "cuda" or not half_precision:
        return None
    name = torch.cuda.get_device_name(device)
    tflops = table_peak(name)
    return Peak(tflops, f"{name}, dense bf16/fp16") if tflops is not None else None
