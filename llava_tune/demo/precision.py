"""`python -m llava_tune.demo.precision`: the demo's train.mixed_precision on this machine.

bf16 where the processor multiplies bf16 natively: a CPU with AVX512-BF16 or AMX (the demo's
stage 2 ran 1.36x as fast as in fp32 on a 2-core AMD EPYC with AVX512-BF16), or a GPU (auto
picks it there). Any other CPU trains in fp32: it would emulate bf16, slower than fp32.
"""

from __future__ import annotations

import torch


def demo_precision() -> str:
    """train.mixed_precision for the demo's stages: auto on a GPU, else bf16 or no."""
    if torch.cuda.is_available():
        return "auto"
    native = [getattr(torch.cpu, name, lambda: False)()
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "no"


if __name__ == "__main__":
    print(demo_precision())
