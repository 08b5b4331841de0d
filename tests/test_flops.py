"""Model FLOPs (training/flops.py) against a hand count and against torch's own count of the
products a real step runs; packing and stages change them as they should; the GPU peak table
(training/peaks.py); metrics.jsonl and the progress lines report them, and MFU only where a
peak is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import STAGE_DATA
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llava_tune.cli.train_printer import TrainPrinter
from llava_tune.config import load_config
from llava_tune.data.collate import Collator
from llava_tune.errors import UserError
from llava_tune.training import train
from llava_tune.training.events import Logged
from llava_tune.training.flops import LLMShape, StepCost, TowerShape, step_cost
from llava_tune.training.peaks import find_peak, table_peak
from llava_tune.training.setup import build_dataset, build_for_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
SHAPE = LLMShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                 vocab=1000)


def test_llm_flops_by_hand():
    # A layer's products: q and o 64 x 64, k and v 64 x (2 x 16), the MLP 3 x 64 x 128.
    assert SHAPE.layer_weights == 2 * 4096 + 2 * 2048 + 3 * 8192 == 36_864
    full = StepCost(llm=SHAPE, llm_mode="full")
    # 10 tokens, 4 of them with a label: 6 FLOPs per weight per token for the layers, the LM
    # head (64 x 1000) on the 4 label tokens only, attention 12 x layers x 64 x 10^2.
    assert full.llm_flops([10], 4) == 6 * 2 * 36_864 * 10 + 6 * 64_000 * 4 + 12 * 2 * 64 * 100
    assert full.llm_flops([10], 4) == 6_113_280
    # Frozen (pretrain): forward and the input's gradient, no weight gradient: 4 per weight.
    frozen = StepCost(llm=SHAPE, llm_mode="frozen")
    assert frozen.llm_flops([10], 4) == 4 * 2 * 36_864 * 10 + 4 * 64_000 * 4 + 153_600
    # LoRA: the base weights as frozen, LoRA's own weights trained (6 each).
    lora = StepCost(llm=SHAPE, llm_mode="lora", llm_lora=1000)
    assert lora.llm_flops([10], 4) == frozen.llm_flops([10], 4) + 6 * 1000 * 10


def test_packed_samples_cost_less_attention_than_one_of_their_length():
    cost = StepCost(llm=SHAPE, llm_mode="lora")
    packed, one = cost.llm_flops([300, 200], 100), cost.llm_flops([500], 100)
    assert packed < one
    # Only attention differs: 12 x layers x d x (500^2 - 300^2 - 200^2).
    assert one - packed == 12 * 2 * 64 * (500**2 - 300**2 - 200**2)
    # Padding costs nothing: the lengths are the samples' real ones.
    assert cost.llm_flops([300, 200], 100) == cost.llm_flops([200, 300], 100)


def test_vision_flops_by_hand_and_by_stage():
    tower = TowerShape(blocks=2, width=64, mlp_width=256, patch=16, patches=4)
    assert tower.block_weights == 4 * 64 * 64 + 2 * 64 * 256 and tower.tokens == 5
    forward = (2 * 3 * 16 * 16 * 64 * 4 + 2 * 2 * tower.block_weights * 5
               + 4 * 2 * 64 * 5 * 5)  # patch embedding, blocks, attention: per input
    projector = 4 * 64 * 64 * 4 + 6 * 64 * 64 * 4  # first Linear (no gradient below), second
    cost = {mode: StepCost(llm=SHAPE, llm_mode="frozen", tower=tower, tower_mode=mode,
                           projector_in=64 * 64, projector_rest=64 * 64)
            for mode in ("frozen", "lora", "full")}
    # A frozen tower with nothing trainable before it runs forward only: 2 per weight.
    assert cost["frozen"].vision_flops(3) == 3 * (forward + projector)
    # From the feature cache the tower does not run: the projector alone.
    assert cost["frozen"].vision_flops(3, tower_runs=False) == 3 * projector
    # Trained (full): 6 per weight, the patch embedding 4 (pixels need no gradient), attention
    # with its backward; the projector's first Linear passes the gradient on to the tower.
    full = (4 * 3 * 16 * 16 * 64 * 4 + 6 * 2 * tower.block_weights * 5 + 12 * 2 * 64 * 25
            + 6 * 64 * 64 * 4 * 2)
    assert cost["full"].vision_flops(1) == full
    assert cost["frozen"].vision_flops(1) < cost["lora"].vision_flops(1) < full
    assert cost["frozen"].vision_flops(0) == 0
    no_tower = StepCost(llm=SHAPE, llm_mode="lora")
    assert no_tower.vision_flops(3) == 0


def measured(model: torch.nn.Module, batch) -> int:
    """torch's count of the products that one forward and backward of `batch` run.
    Attention in its plain form (SDPA's math backend): torch counts no FLOPs for the CPU's
    fused kernel."""
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch.model_inputs()).loss_sum.backward()
    return counter.get_total_flops()


def built(stage: str, stage_overrides, *extra: str):
    config = load_config(DEMO / f"{stage}.yaml", [*stage_overrides(stage), "init_from=null",
                                                  "data.max_length=64", *extra])
    bundle, _ = build_for_training(config, device="cpu")
    dataset = build_dataset(config, bundle, config.data.train)
    # One sample: no padding, which the hardware computes and model FLOPs do not count.
    batch = Collator(bundle.tokenizer.pad_token_id)([dataset[0]])
    return bundle.model, step_cost(bundle.model, config), batch


# The LLM in full precision: bitsandbytes' 4-bit products are calls torch does not count.
EXACT = {"pretrain": [], "finetune": ["model.quantization=null"],
         "finetune-vision-full": ["model.quantization=null", "train.vision=full"],
         "sft-full": ["train.llm=full"]}


@pytest.mark.parametrize("case", EXACT)
def test_count_equals_torchs_count(case, stage_overrides):
    """Frozen tower (forward only) and LLM (forward and the input's gradient), projector, LoRA
    on the LLM, a tower trained whole, an LLM trained whole: to the FLOP."""
    model, cost, batch = built(case.split("-")[0], stage_overrides, *EXACT[case])
    llm, vision = cost.of_batch(batch)
    assert llm > 0 and (vision > 0) == (case != "sft-full")
    assert measured(model, batch) == llm + vision


@pytest.mark.parametrize("stage, extra", [
    ("sft", []), ("finetune", ["model.quantization=null", "train.vision=lora",
                               "train.vision_lora.r=4"])], ids=["sft-lora", "vision-lora"])
def test_count_near_torchs_count_with_lora_at_the_bottom(stage, extra, stage_overrides):
    """LoRA with nothing trainable below it: the first layer's q, k and v need no input
    gradient (nothing before them trains), which the count includes anyway: 4% over at 2
    layers, under 0.3% at InternLM2's 24 or 32, about 0.5% at CLIP ViT-L's 23 blocks."""
    model, cost, batch = built(stage, stage_overrides, *extra)
    counted, torch_count = sum(cost.of_batch(batch)), measured(model, batch)
    assert torch_count < counted < 1.05 * torch_count


def test_feature_cache_leaves_the_tower_out(stage_overrides):
    model, cost, batch = built("pretrain", stage_overrides)
    with torch.no_grad():
        features = model.vision(batch.pixel_values)
    cached = batch.to("cpu")  # a copy
    cached.pixel_values, cached.image_features = None, features
    llm, vision = cost.of_batch(cached)
    assert (llm, vision) == (cost.of_batch(batch)[0], cost.vision_flops(1, tower_runs=False))
    assert measured(model, cached) == llm + vision


def test_gpu_peaks():
    assert table_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert table_peak("NVIDIA H100 PCIe") == 756.0
    assert table_peak("NVIDIA H100 NVL") == 835.5
    assert table_peak("NVIDIA H200") == table_peak("NVIDIA GH200 480GB") == 989.4
    assert table_peak("NVIDIA A100-SXM4-80GB") == table_peak("NVIDIA A100 80GB PCIe") == 312.0
    assert table_peak("NVIDIA L40S") == 362.05
    assert table_peak("NVIDIA L40") == 181.05
    assert table_peak("NVIDIA L4") == 121.0
    assert table_peak("NVIDIA GeForce RTX 4090") == 165.2
    assert table_peak("Tesla V100-SXM2-32GB") == 125.0
    assert table_peak("Tesla V100-PCIE-16GB") == 112.0
    assert table_peak("NVIDIA A10") == 125.0
    assert table_peak("NVIDIA A10G") is None  # no published figure: train.peak_tflops
    assert table_peak("Some Future GPU") is None
    cpu = torch.device("cpu")
    assert find_peak(None, cpu, half_precision=True) is None
    assert find_peak(50.0, cpu, half_precision=False).tflops == 50.0


def test_peak_tflops_must_be_positive(stage_overrides):
    for value in ("0", "-1.5"):
        with pytest.raises(UserError, match=rf"train.peak_tflops={value} must be above 0"):
            load_config(DEMO / "sft.yaml", [*stage_overrides("sft"), f"train.peak_tflops={value}"])
    assert load_config(DEMO / "sft.yaml", [*stage_overrides("sft"), "train.peak_tflops=989"]) \
        .train.peak_tflops == 989


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU of the table MFU is known")
def test_metrics_report_flops_and_no_mfu_on_the_cpu(tiny_finetune_run):
    rows = [json.loads(line) for line in (tiny_finetune_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["flops_per_token_llm"] > 0 and row["flops_per_token_vision"] > 0
        achieved = (row["flops_per_token_llm"] + row["flops_per_token_vision"]) * row["tokens"] \
            / row["seconds"] / 1e12  # one process
        assert row["tflops"] == pytest.approx(achieved, rel=1e-3, abs=2e-6)
        assert "mfu" not in row  # unknown, not 0


def test_mfu_with_a_given_peak(tmp_path, tiny_lm, shapes_data):
    config = load_config(DEMO / "sft.yaml", [
        f"model.llm={tiny_lm}", f"data.train={shapes_data / STAGE_DATA['sft']}",
        f"run_dir={tmp_path / 'run'}", "train.max_steps=2", "train.log_every=1",
        "data.max_length=64", "train.peak_tflops=0.01"])
    events = []
    train(config, on_event=events.append)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["flops_per_token_vision"] == 0  # no tower in sft
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.01, rel=1e-3, abs=1e-4)
    assert "MFU against 0.01 TFLOP/s per process (train.peak_tflops)" in events[0].notes
    assert [e.mfu for e in events if isinstance(e, Logged)] == [row["mfu"] for row in rows]


def test_progress_lines_show_mfu_or_tflops(capsys):
    printer = TrainPrinter(bar=False)
    base = dict(total_steps=9, epoch=0, loss=1.0, lr=1e-4, tokens_per_s=1000.0, memory_mb=1.0)
    printer(Logged(step=1, tflops=123.456, mfu=0.4123, **base))
    printer(Logged(step=2, tflops=0.0123, mfu=None, **base))
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("1000 tok/s 41.2% MFU")
    assert err[1].endswith("1000 tok/s 0.0123 TFLOP/s")
