"""llava-tune against what users would pick instead, side by side on identical inputs.

(The command line; the parts are in scripts/benchlib/: data.py the inputs, runs.py running
each system, peer.py the peer's worker, profile.py where a step's time goes. To run it on
another machine, copy bench_train.py with benchlib/ beside it.)

    python scripts/bench_train.py --data demo|mix|anyres [--size demo|1_8b] [--steps 40] [--warmup 5]
        [--batch-size 8] [--repeats 3] [--ours-override k=v ...] [--out results.json]
    python scripts/bench_train.py --data mix --check      # same first batch: the two losses agree
    python scripts/bench_train.py --data mix --profile    # where one step's time goes, both systems

"ours" is `llava-tune train` (the CLI, in its own process) on the finetune config of --size,
with --ours-override key=value pairs applied on top: whatever llava-tune does today is what is
measured. "peer" is what most tutorials and TRL do instead: transformers'
LlavaForConditionalGeneration loaded 4-bit (bitsandbytes NF4), peft get_peft_model (LoRA on
every linear layer of the LLM, projector trainable through modules_to_save, vision tower
frozen) and the HF Trainer with its defaults: random order, padding to the longest sample of
each batch, no packing, no length grouping; fp32 on the CPU, bf16 on a GPU.

Both start from identical weights: a finetune-stage starting point (a 1-step pretrain run at
lr=1e-12, i.e. the seeded random projector on the base LLM) exported with llava-tune's hf-llava
exporter, which the peer loads. Both see identical token ids and pixels: the peer's dataset
is llava-tune's ConversationDataset with its image slots (IMAGE_TOKEN_INDEX) turned into the
Llava image token id. LoRA r/alpha, lr, batch size, steps, warm-up, weight decay, grad
clipping, gradient checkpointing, seed and data workers come from our config (without the
--ours-override pairs) for both; LoRA dropout is 0 in both, and a step is one batch
(grad_accum 1). Two choices keep the math identical: the exported LM head's extra row for
`<image>` (never a target) is dropped in the peer, so both softmaxes run over the same
vocabulary; and the peer skips peft's prepare_model_for_kbit_training, which would upcast
its non-quantized weights to fp32 where ours keeps bf16 on a GPU.

Each run is its own process, alternating ours/peer; --repeats of each; the medians are
reported. Steady state excludes the first --warmup steps. Real tokens count every non-padding
position (image slots included) in both systems; samples/s is real tokens/s divided by the
data set's mean real tokens per sample (the same divisor for both; with packing ours has no
fixed samples per step). Peak memory: max_memory_allocated on a GPU; on the CPU each process's
own peak RSS (VmHWM) read by itself when its training ends. Not wait4's ru_maxrss of the
process: that one also counts the parent's peak (a vfork + exec child inherits it) and the
interpreter's exit, where destructors in torch's shared libraries page in up to ~120 MB of
code (measured: `import torch` alone, 507 MB in the process, 632 MB by wait4); it is kept in
the results as process_peak_mb.

--data anyres: the same comparison on tiles (model.image_aspect=anyres, LLaVA-NeXT): the
detail scenes of llava_tune/demo/scenes.py, images of 4 x 1, 1 x 4 and 2 x 2 tower sides cut
into the grids [[1,4],[4,1],[2,2]] (an overview + 4 tiles each, unpadded, a newline per row);
the peer is transformers' LlavaNextForConditionalGeneration loaded from our hf-llava-next
export (its image_newline trainable, as ours is), fed the same tiles and image sizes.

--size demo: the demo's 4-layer InternLM2-architecture LM and tiny ViT (llava_tune/demo/make.py),
data.max_length 128 (demo) / 1024 (mix). --size 1_8b: InternLM2-chat-1.8B's shapes with
random weights (vocabulary 92544; the text is tokenized by a 768-piece byte-fallback demo
tokenizer trained on the data, which gives the mix's words about as many tokens as
InternLM2's own tokenizer) and a random ViT-L/14-336, data.max_length 2048, GPU only. Models, data, the starting point and its export are built once under
--work and reused.

--check: one identical batch (the first --batch-size records) through both, first-step loss of
each (ours: metrics.jsonl, the mean over label tokens; peer: the Trainer's compute_loss).
--profile: a short torch.profiler window per system after --warmup steps: milliseconds per
step by phase (GPU synchronized at phase boundaries) and the top ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchlib.data import ROOT, SIZES, prepare
from benchlib.peer import peer_worker
from benchlib.profile import PHASES, ours_profile_worker
from benchlib.runs import benchmark, check_identity, gpu_available, run_profiles

from llava_tune.errors import UserError

# --------------------------------------------------------------------------- printing


def print_profiles(profiles: dict) -> None:
    ours, peer = profiles["ours"], profiles["peer"]
    print(f"\nwhere a step's time goes (ms per step over {ours['steps']} profiled steps)")
    print(f"{'phase':42s} {'ours':>16s} {'peer':>16s}")
    for phase in PHASES:
        cells = [f"{p['ms_per_step'][phase]:9.1f} {100 * p['ms_per_step'][phase] / p['step_ms']:4.0f}%"
                 for p in (ours, peer)]
        print(f"{phase:42s} {cells[0]:>16s} {cells[1]:>16s}")
    print(f"{'total':42s} {ours['step_ms']:9.1f}       {peer['step_ms']:9.1f}")
    print(f"{'real tokens per step':42s} {ours['tokens_per_step']:9.0f}       "
          f"{peer['tokens_per_step']:9.0f}")
    for name, p in profiles.items():
        print(f"\ntop ops by self CPU time, {name} (ms per step)")
        for e in p["top_ops"]:
            gpu = f"  gpu {e['self_gpu_ms_per_step']:8.2f}" if e["self_gpu_ms_per_step"] else ""
            print(f"  {e['self_cpu_ms_per_step']:9.2f}{gpu}  x{e['calls_per_step']:<6g} {e['op'][:70]}")
        if p["top_gpu_ops"]:
            print(f"top ops by GPU time, {name} (ms per step)")
            for e in p["top_gpu_ops"]:
                print(f"  {e['self_gpu_ms_per_step']:9.2f}  {e['op'][:80]}")


def head_share(llm: Path) -> str:
    """The LM head's share of a token's forward products (every position through the head, as
    the peer runs it; ours runs only label positions through it): how far a vocabulary's
    size decides speed. InternLM2-chat-1.8B: 11%; 7B: 5% (same vocabulary)."""
    from types import SimpleNamespace

    from llava_tune.training.flops import LLMShape

    # InternLM2's config.json names these fields as Llama's does
    shape = LLMShape.from_config(SimpleNamespace(**json.loads((llm / "config.json").read_text())))
    body = shape.layers * shape.layer_weights
    return (f"LM head: {shape.hidden} x {shape.vocab}, {100 * shape.head_weights / (body + shape.head_weights):.0f}% "
            f"of a token's products ({shape.layers} layers of {shape.hidden})")


def print_table(result: dict[str, Any], memory: str) -> None:
    rows = [("ours (llava-tune)", result["ours"]["median"]),
            ("peer (HF Trainer)", result["peer"]["median"])]
    print(f"\n{'':20s} {'real tokens/s':>14s} {'samples/s':>10s} {'peak ' + memory:>18s}")
    for name, m in rows:
        print(f"{name:20s} {m['tokens_per_s']:14.1f} {m['samples_per_s']:10.2f} "
              f"{m['peak_mb']:15.0f} MB")
    r = result["ours_over_peer"]
    print(f"{'ours / peer':20s} {r['tokens_per_s']:13.2f}x {r['samples_per_s']:9.2f}x "
          f"{r['peak_mb']:17.2f}x")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["demo", "mix", "anyres"], default="demo")
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system")
    parser.add_argument("--ours-override", action="extend", nargs="+", default=[], metavar="K=V",
                        help="key=value for ours only, e.g. data.pack=true")
    parser.add_argument("--records", type=int, default=2000, help="records in the generated data")
    parser.add_argument("--peer-sampling", choices=["random", "group_by_length"],
                        help="the HF Trainer's train_sampling_strategy (default: group_by_length "
                        "for --data mix, where any Trainer user switches it on; else random); "
                        "ours groups by length when the peer does")
    parser.add_argument("--vocab", choices=["demo", "real"], default="demo",
                        help="real: InternLM2's tokenizer and 92,544-word vocabulary on the "
                        "demo's small layers (a real LM head; needs ../shared/fixtures)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench",
                        help="where data, models, exports and runs go (reused)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="only compare the first-step loss on one identical batch")
    mode.add_argument("--profile", action="store_true",
                      help="only profile a short window of each system")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps after --warmup")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        worker = {"peer": peer_worker, "profile-ours": ours_profile_worker}[kind]
        worker(json.loads(Path(spec).read_text()))
        return 0
    try:
        return _main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if min(args.batch_size, args.repeats, args.warmup, args.records, args.profile_steps) < 1:
        raise UserError("--batch-size, --repeats, --warmup, --records and --profile-steps must be >= 1")
    if args.steps <= args.warmup:
        raise UserError(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}; "
                        "give more --steps")
    for item in args.ours_override:
        if "=" not in item:
            raise UserError(f"--ours-override {item!r} is not key=value (e.g. data.pack=true)")
    gpu = gpu_available()
    if SIZES[args.size].gpu_only and not gpu:
        raise UserError(f"--size {args.size} needs a GPU: a 1.8B LLM with a ViT-L/14-336 takes "
                        "minutes per step on a CPU; use --size demo here")
    from llava_tune.cli import quiet_libraries

    quiet_libraries()
    work = args.work.resolve()
    print(f"preparing {args.size} models and {args.data} data under {work} ...", file=sys.stderr)
    sampling = args.peer_sampling or ("group_by_length" if args.data == "mix" else "random")
    setup = prepare(args.size, args.data, work, args.records, args.seed, args.vocab, sampling)
    device = _device_name()
    settings = {**{k: v for k, v in vars(args).items() if k not in ("worker", "out", "work")},
                "device": device, "work": str(setup.work)}
    if args.check:
        result = check_identity(setup, args.batch_size, args.ours_override)
        tolerance = 1e-4 if not gpu else 2e-2  # bf16 autocast on a GPU
        ok = result["abs_diff"] <= tolerance
        print(f"first-step loss on one identical batch of {args.batch_size}: "
              f"ours {result['ours']:.6f}, peer {result['peer']:.6f}, |diff| {result['abs_diff']:.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {tolerance:g})")
        print(f"trainable parameters: ours {result['trainable']['ours']}, "
              f"peer {result['trainable']['peer']}")
        _write(args.out, {"settings": settings, "check": {**result, "tolerance": tolerance, "ok": ok}})
        return 0 if ok else 1
    if args.profile:
        profiles = run_profiles(setup, args.warmup, args.profile_steps, args.batch_size,
                                args.ours_override)
        print_profiles(profiles)
        _write(args.out, {"settings": settings, "profile": profiles})
        return 0
    result = benchmark(setup, args.steps, args.warmup, args.batch_size, args.repeats,
                       args.ours_override, log=lambda m: print(m, file=sys.stderr))
    print(f"\n--size {args.size} --data {args.data} on {device}: {args.steps} steps "
          f"({args.warmup} warm-up) x batch {args.batch_size}, median of {args.repeats}; "
          f"ours with {args.ours_override or 'its config as is'}, peer {sampling}")
    print(head_share(setup.llm))
    print_table(result, "GPU alloc" if gpu else "RSS")
    _write(args.out, {"settings": settings, **result})
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results in {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
