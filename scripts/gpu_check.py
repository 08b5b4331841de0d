"""Real-size check on a GPU: stage 1, stage 2 and text SFT of the 1.8B recipe, 20 steps each,
with the shipped configs (bf16, 4-bit NF4, gradient checkpointing, up to 2048 tokens), on a
random InternLM2-chat-1.8B and a random CLIP ViT-L/14-336 (nothing is downloaded). Prints and
writes to REPORT/gpu_check.json, per stage: peak GPU memory (torch's allocated and reserved),
steady tokens/s and seconds per step (first log window excluded), wall time (imports, data,
loading and 4-bit quantization included), model TFLOP/s and MFU (the trainer's own, from
metrics.jsonl: README, "Reading MFU"). After the finetune stage, its run behind `llava-tune
serve` under 1 and 8 clients (requests/s, median latency), and, where vLLM is installed, its
hf-llava export behind `vllm serve`, asked once (REPORT/vllm.log has its output). First, on a
GPU, the tests that only a GPU runs (GPU_TESTS: torch's varlen attention against the masked
one); their output goes to REPORT/gpu_tests.log.

    python scripts/gpu_check.py [OUT]             (scripts/gpu_check.sh is the same)
    python scripts/gpu_check.py --dry-run [OUT]   # any machine: tiny models, 2 steps, 64 tokens
    python scripts/gpu_check.py --stages finetune,sft --steps 10 --report-dir R OUT

OUT holds the big files (the random checkpoint: ~4 GB at 1.8B, ~15 GB at 7B, its converted copy
in OUT/cache, the run dirs); REPORT (--report-dir, default OUT) gets only small ones, rewritten
as each stage ends: gpu_check.json and each stage's log (STAGE.log). --like internlm2-chat-7b
checks the 7B recipe instead. A finetune without the pretrain stage starts from a random
projector (same cost). The tokenizer is --tokenizer DIR, else InternLM2's real one when
../shared/fixtures/internlm2-tokenizer exists, else a byte-fallback tokenizer trained on the
generated text (the vocabulary stays 92,544, so logits and memory are the real ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "internlm2-tokenizer"
CONFIG_DIRS = {"internlm2-chat-1_8b": "internlm2_chat_1_8b", "internlm2-chat-7b": "internlm2_chat_7b"}
STAGES = ("pretrain", "finetune", "sft")
GPU_TESTS = ["tests/test_sft.py::test_varlen_attention_on_the_gpu_equals_the_masked_one"]
def prepare(out: Path, like: str, dry_run: bool, tokenizer: Path | None) -> dict[str, Path]:
    """The random LLM, the vision tower (weights file or None), the data; made once."""
    from llava_tune.demo import make, mix
    from llava_tune.demo import tokenizer as demo_tokenizer
    from llava_tune.demo.random_checkpoint import write_checkpoint

    data = out / "data"
    if not (data / "mix.json").is_file():
        mix.generate_mix(data, n_records=64 if dry_run else 800, seed=0,
                         image_size=32 if dry_run else 336)
    lm = out / ("lm-tiny" if dry_run else f"lm-{like}")
    if not (lm / "config.json").is_file():
        if tokenizer is None and (REAL_TOKENIZER / "tokenizer.model").is_file():
            tokenizer = REAL_TOKENIZER
        if tokenizer is None:
            texts = demo_tokenizer.llava_texts(json.loads((data / "mix.json").read_text()))
            tokenizer = demo_tokenizer.train_tokenizer(texts, out / "tokenizer", 768)
        write_checkpoint("tiny" if dry_run else like, lm, tokenizer=tokenizer,
                         device="cpu" if dry_run else "cuda")  # 7B on the CPU: minutes
        if not dry_run:
            import torch

            torch.cuda.empty_cache()  # the stages' processes get the whole card
    text = data / "text.json"  # the text-only records, for the sft stage
    if not text.is_file():
        # 6 copies of the 800-record mix's 267 (~139k tokens): ~400 packed 2048-token rows,
        # so 20 steps of 16 rows run in one epoch (no short step at an epoch's end)
        records = [r for r in json.loads((data / "mix.json").read_text()) if "image" not in r]
        text.write_text(json.dumps([{**r, "id": f"{r['id']}-{k}"} for k in range(6)
                                    for r in records]))
    paths = {"lm": lm, "data": data / "mix.json", "text": text, "images": data / "images"}
    if dry_run:
        config, weights = make.make_vision(out / "vision", seed=0, config={
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                            "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1,
                         "layers": 1}}, name="gpu-check-tiny-vit")
        paths.update(vision_config=config, vision_weights=weights)
    return paths


def stage_overrides(stage: str, paths: dict[str, Path], out: Path, dry_run: bool, steps: int,
                    stages: list[str]) -> list[str]:
    length = 64 if dry_run else 2048
    data = paths["text"] if stage == "sft" else paths["data"]
    items = [f"model.llm={paths['lm']}", f"data.train={data}", f"run_dir={out / stage}",
             f"train.max_steps={steps}", f"data.max_length={length}", "train.log_every=1" if
             dry_run else "train.log_every=5", "train.save_every=null",
             f"data.cache_dir={out / 'cache'}", "data.eval=null"]
    if dry_run:
        items.append("data.num_workers=2")  # else the config's (4)
    if stage != "sft":
        items.append(f"data.image_folder={paths['images']}")
        if dry_run:
            items += ["model.vision.name=gpu-check-tiny-vit",
                      f"model.vision.config_file={paths['vision_config']}",
                      f"model.vision.pretrained={paths['vision_weights']}"]
        else:
            items.append("model.vision.pretrained=null")  # random ViT-L/14-336: same shapes
    if stage == "finetune":
        items.append(f"init_from={out / 'pretrain'}" if "pretrain" in stages else "init_from=null")
    if dry_run:
        items.append("train.batch_size=2")
    return items


def run_stage(stage: str, config: Path, overrides: list[str], out: Path, report: Path) -> dict:
    env = {**os.environ, "LLAVA_TUNE_CACHE": str(out / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    log = report / f"{stage}.log"
    start = time.time()
    with open(log, "w") as output:  # written as it runs: a run stopped at a time limit keeps it
        code = subprocess.run([sys.executable, "-m", "llava_tune", "--quiet", "train",
                               str(config), *overrides, "--overwrite"], env=env, cwd=ROOT,
                              text=True, stdout=output, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{stage} failed (exit {code}); last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-25:]))
    wall = time.time() - start
    lines = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "tokens" in r]
    steady = rows[1:] or rows  # the first window holds the warm-up (allocations, autotuning)
    steps = rows[-1]["step"] - (rows[0]["step"] if len(rows) > 1 else 0)
    tokens, seconds = sum(r["tokens"] for r in steady), sum(r["seconds"] for r in steady)
    tokens_per_s = tokens / max(seconds, 1e-9)
    reserved = [r["memory_reserved_mb"] for r in rows if "memory_reserved_mb" in r]  # CUDA only
    # The trainer's model TFLOP/s and MFU (absent where the GPU's peak is not known) over the
    # steady windows: each window's weighs by its seconds, so the mean is their FLOPs over
    # their time.
    tflops = sum(r["tflops"] * r["seconds"] for r in steady) / max(seconds, 1e-9)
    mfu = (sum(r["mfu"] * r["seconds"] for r in steady) / max(seconds, 1e-9)
           if all("mfu" in r for r in steady) else None)
    return {"stage": stage, "steps": rows[-1]["step"], "wall_s": round(wall, 1),
            "train_s": round(sum(r["seconds"] for r in rows), 1),  # wall - train: load, save
            "peak_memory_mb": max(r["memory_mb"] for r in rows),  # CUDA: torch's allocated
            "peak_reserved_mb": max(reserved) if reserved else None,  # torch's reserved
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_step": round(tokens / max(steps, 1)),
            "s_per_step": round(seconds / max(steps, 1), 3),
            "tflops": round(tflops, 3), "mfu": round(mfu, 4) if mfu is not None else None,
            "last_loss": rows[-1]["loss"]}


def serve_check(out: Path, paths: dict[str, Path], report_dir: Path) -> dict:
    """The finetune run behind `llava-tune serve` (scripts/bench_serve.py's load: 16 requests
    about the data's images, 1 and 8 clients); then, where vLLM is installed, its hf-llava
    export behind `vllm serve`, asked once through the openai client."""
    import bench_serve

    os.environ["LLAVA_TUNE_CACHE"] = str(out / "cache")
    images = sorted(paths["images"].glob("*.jpg"))[:8]
    requests = [(image, "What is in the image?") for image in images] * 2
    server, url = bench_serve.start_server(out / "finetune", max_tokens=32)
    try:
        loads = {clients: bench_serve.under_load(url, requests, clients) for clients in (1, 8)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {f"serve_{clients}_clients": {
        "requests_per_s": round(r["requests_per_s"], 2), "errors": len(r["errors"]),
        "p50_s": round(bench_serve.percentile(r["latencies"], 0.5), 3) if r["latencies"] else None}
        for clients, r in loads.items()}
    result["vllm"] = vllm_check(out, images[0], report_dir)
    return result


def vllm_check(out: Path, image: Path, report_dir: Path) -> dict | str:
    """`vllm serve` on the finetune run's hf-llava export, with the flags the README gives."""
    import importlib.util
    import signal

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed here"
    import base64

    import openai

    export = out / "finetune-hf"
    subprocess.run([sys.executable, "-m", "llava_tune", "--quiet", "export", str(out / "finetune"),
                    str(export), "--format", "hf-llava", "--force"], check=True)
    start = time.time()
    with open(report_dir / "vllm.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve",
                                   str(export), "--chat-template",
                                   str(export / "chat_template_with_bos.jinja"),
                                   "--served-model-name", "llava-tune", "--max-model-len", "4096",
                                   "--gpu-memory-utilization", "0.5", "--host", "127.0.0.1",
                                   "--port", "8011"], stdout=log, stderr=subprocess.STDOUT)
        try:
            client = openai.OpenAI(base_url="http://127.0.0.1:8011/v1", api_key="none",
                                   max_retries=0, timeout=120)
            for _ in range(300):
                if server.poll() is not None:
                    return {"ok": False, "error": f"vllm serve exited {server.returncode}; "
                            f"see {report_dir / 'vllm.log'}"}
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    time.sleep(2)
            url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
            answer = client.chat.completions.create(model="llava-tune", temperature=0,
                                                    max_tokens=32, messages=[{
                "role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": "What is in the image?"}]}])
            return {"ok": True, "start_s": round(time.time() - start, 1),
                    "finish_reason": answer.choices[0].finish_reason,
                    "usage": answer.usage.model_dump() if answer.usage else None}
        except Exception as err:  # noqa: BLE001  (reported, the check goes on)
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def gpu_tests(report_dir: Path) -> str:
    """GPU_TESTS under pytest (they skip on a CPU): pytest's summary line."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *GPU_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    (report_dir / "gpu_tests.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else f"pytest exited {done.returncode}"


def print_table(report: dict) -> None:
    print(f"{report['like']}{' (dry run: tiny models)' if report['dry_run'] else ''} on "
          f"{report['device']}; setup {report['prepare_s']} s (data, random checkpoint)")
    print(f"{'':15s} {'peak memory MB':^19s}")
    print(f"{'stage':9s} {'steps':>5s} {'alloc MB':>9s} {'reserv MB':>9s} {'tokens/s':>9s} "
          f"{'tok/step':>8s} {'s/step':>7s} {'wall s':>7s} {'train s':>7s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} "
          f"{'last loss':>9s}")
    for r in report["stages"]:
        reserved = f"{r['peak_reserved_mb']:9.0f}" if r["peak_reserved_mb"] else f"{'-':>9s}"
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6s}"
        print(f"{r['stage']:9s} {r['steps']:5d} {r['peak_memory_mb']:9.0f} {reserved} "
              f"{r['tokens_per_s']:9.1f} {r['tokens_per_step']:8d} {r['s_per_step']:7.2f} "
              f"{r['wall_s']:7.1f} {r['train_s']:7.1f} {r['tflops']:8.3g} {mfu} "
              f"{r['last_loss']:9.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models, 2 steps at 64 tokens, on any machine")
    parser.add_argument("--like", default="internlm2-chat-1_8b", choices=sorted(CONFIG_DIRS))
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated, of pretrain,finetune,sft (run in that order)")
    parser.add_argument("--steps", type=int, help="optimizer steps per stage (20; dry run 2)")
    parser.add_argument("--report-dir", type=Path,
                        help="where gpu_check.json and the stage logs go (default OUT)")
    parser.add_argument("--tokenizer", type=Path, help="folder with InternLM2's tokenizer.model")
    args = parser.parse_args(argv)
    stages = [s for s in STAGES if s in args.stages.split(",")]
    if not stages or set(args.stages.split(",")) - set(STAGES):
        parser.error(f"--stages: a comma-separated list of {','.join(STAGES)}")
    steps = args.steps or (2 if args.dry_run else 20)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry-run to check the path on the CPU",
              file=sys.stderr)
        return 2
    out = args.out.resolve()
    report_dir = (args.report_dir or out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    paths = prepare(out, args.like, args.dry_run, args.tokenizer)
    configs = ROOT / "configs" / CONFIG_DIRS[args.like]
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    report = {"like": args.like, "dry_run": args.dry_run, "device": device,
              "torch": torch.__version__, "steps": steps, "prepare_s": round(time.time() - start, 1),
              "stages": []}
    print(f"prepared in {report['prepare_s']} s; stages: {', '.join(stages)}", flush=True)
    if cuda:
        report["gpu_tests"] = gpu_tests(report_dir)
        print(f"gpu tests: {report['gpu_tests']}", flush=True)
    for stage in stages:
        report["stages"].append(run_stage(
            stage, configs / f"{stage}.yaml",
            stage_overrides(stage, paths, out, args.dry_run, steps, stages), out, report_dir))
        (report_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"{stage} done: {json.dumps(report['stages'][-1])}", flush=True)
    print_table(report)
    if "finetune" in stages:
        report["serve"] = serve_check(out, paths, report_dir)
        (report_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"serve: {json.dumps(report['serve'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
