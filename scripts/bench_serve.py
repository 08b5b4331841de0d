"""`llava-tune serve` under load, against the same model answered one at a time by `chat`.

    python scripts/bench_serve.py [RUN] [--clients 1 4 16] [--requests 48] [--max-tokens 16]
        [--work bench_serve_work] [--out results.json]

RUN is a run dir with a vision tower (default demo_out/finetune, `make demo`'s). Without
one, a stand-in is built under --work in about a minute: the demo's data, tokenizer and random
LM and ViT (`python -m llava_tune.demo`) and a 1-step finetune run on them. Its answers are
noise but its size is the demo's, so its speed is what the demo's model would give (the
answers just run longer: each request asks for at most --max-tokens).

The requests: held-out images of the run's data folder (`<data.image_folder>/heldout`), each
asked its color and its shape, greedy, up to --max-tokens tokens.

1. **chat, one at a time**: the model loaded in this process, each request answered as
   `llava-tune chat` answers it (`ChatSession.ask`), one after the other: requests/s and each
   answer's time.
2. **serve**: `llava-tune serve RUN` in its own process (the real command), then for each
   --clients count C, C threads of the official `openai` client send the requests (each takes
   the next one when its answer is in) until --requests are answered: requests/s, and the
   latency percentiles of a request from its send to its last byte. Every answer is checked
   against chat's for the same image and question.

The two never run at once (2 torch jobs on 2 cores slow each other many times over).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What color is the shape?", "What shape is this?"]


def build_stand_in(work: Path) -> Path:
    """A 1-step finetune run on the demo's random LM and ViT (built once under `work`)."""
    run = work / "finetune"
    if (run / "config.yaml").is_file():
        return run
    python = sys.executable
    subprocess.run([python, "-m", "llava_tune.demo", str(work), "--train", "64", "--heldout",
                    "32"], check=True)
    subprocess.run([python, "-m", "llava_tune", "--quiet", "train",
                    str(REPO / "configs/demo/finetune.yaml"), f"model.llm={work / 'lm-init'}",
                    f"model.vision.config_file={work / 'vision/demo-vit.json'}",
                    f"model.vision.pretrained={work / 'vision/demo-vit.safetensors'}",
                    f"data.train={work / 'shapes/finetune.json'}",
                    f"data.image_folder={work / 'shapes/images'}", "init_from=null",
                    "train.max_steps=1", f"run_dir={run}", "--overwrite"], check=True)
    return run


def requests_of(run: Path, count: int) -> list[tuple[Path, str]]:
    """(image, question) pairs: held-out images of the run's data, color then shape."""
    import yaml

    folder = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["image_folder"])
    images = sorted((folder / "heldout").glob("*.png"))
    if not images:
        raise SystemExit(f"no held-out images in {folder / 'heldout'}: give a demo run dir")
    pairs = [(image, question) for image in images for question in QUESTIONS]
    return [pairs[i % len(pairs)] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_at_a_time(run: Path, requests: list[tuple[Path, str]], max_tokens: int) -> dict:
    """chat's answers, one after the other, in this process."""
    from llava_tune.assembly.model import load_model
    from llava_tune.inference.chat import ChatSession
    from llava_tune.inference.generate import GenerationSettings

    bundle = load_model(run)
    settings = GenerationSettings(max_new_tokens=max_tokens)
    answers, times = {}, []
    start = time.perf_counter()
    for image, question in requests:
        began = time.perf_counter()
        session = ChatSession(bundle, system=bundle.template.default_system, settings=settings)
        session.attach_image(image)
        answers[image, question] = session.ask(question)
        times.append(time.perf_counter() - began)
    wall = time.perf_counter() - start
    return {"requests_per_s": len(requests) / wall, "wall_s": wall, "latencies": times,
            "answers": answers}


def start_server(run: Path, max_tokens: int,
                 max_batch: int | None = None) -> tuple[subprocess.Popen, str]:
    """`llava-tune serve RUN` on a free port (model name "bench"): the process and its URL."""
    command = [sys.executable, "-m", "llava_tune", "serve", str(run), "--port", "0",
               "--served-model-name", "bench", "--max-new-tokens", str(max_tokens),
               "--max-queue", "256"]
    if max_batch:
        command += ["--max-batch", str(max_batch)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("llava-tune serve:"):
            url = line.split(" on ")[1].split()[0]
            # The request log goes on; keep reading it so the pipe never fills.
            threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()
            return server, url
    raise SystemExit(f"llava-tune serve did not start (exit code {server.wait()})")


def under_load(url: str, requests: list[tuple[Path, str]], clients: int,
               expected: dict | None = None) -> dict:
    """`clients` threads of the openai client answer `requests` (each takes the next when
    its answer is in); answers that differ from `expected` (if given) are counted."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    encoded = {image: f"data:image/{image.suffix.lstrip('.').replace('jpg', 'jpeg')};base64,"
               + base64.b64encode(image.read_bytes()).decode()
               for image in {image for image, _ in requests}}
    queue = list(reversed(requests))
    lock = threading.Lock()
    latencies, wrong, errors = [], [], []

    def user() -> None:
        while True:
            with lock:
                if not queue:
                    return
                image, question = queue.pop()
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": encoded[image]}},
                {"type": "text", "text": question}]}]
            began = time.perf_counter()
            try:
                answer = client.chat.completions.create(model="bench", messages=messages,
                                                        temperature=0)
            except Exception as err:  # noqa: BLE001  (counted and reported)
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - began)
            if expected and answer.choices[0].message.content != expected[image, question]:
                wrong.append((image.name, question))

    threads = [threading.Thread(target=user) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests_per_s": len(latencies) / wall, "wall_s": wall,
            "latencies": latencies, "wrong": wrong, "errors": errors}


def row(name: str, result: dict, baseline: float) -> str:
    lat = result["latencies"]
    return (f"| {name} | {result['requests_per_s']:.2f} | {result['requests_per_s'] / baseline:.2f}x"
            f" | {percentile(lat, 0.5):.2f} | {percentile(lat, 0.9):.2f} | "
            f"{percentile(lat, 0.99):.2f} | {len(lat)} | {len(result.get('wrong', []))} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=str(REPO / "demo_out" / "finetune"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="serve --max-batch (default: serve's own)")
    parser.add_argument("--work", default=str(REPO / "bench_serve_work"))
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        print(f"{run} is not a run dir: building a stand-in under {args.work}", file=sys.stderr)
        run = build_stand_in(Path(args.work))
    requests = requests_of(run, args.requests)
    print(f"{len(requests)} requests, greedy, up to {args.max_tokens} tokens, on {run}",
          file=sys.stderr)
    chat = one_at_a_time(run, requests, args.max_tokens)
    server, url = start_server(run, args.max_tokens, args.max_batch)
    try:
        under_load(url, requests[:4], 4, chat["answers"])  # warm-up: first-call costs
        results = [under_load(url, requests, clients, chat["answers"])
                   for clients in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = chat["requests_per_s"]
    print("| answered by | requests/s | vs chat | p50 s | p90 s | p99 s | answers | "
          "differ from chat |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("chat, one at a time", chat, base))
    for result in results:
        print(row(f"serve, {result['clients']} client{'s' * (result['clients'] > 1)}", result,
                  base))
    failed = [e for r in results for e in r["errors"]]
    if failed:
        print(f"{len(failed)} requests failed, e.g. {failed[0]}", file=sys.stderr)
    if args.out:
        chat.pop("answers")
        Path(args.out).write_text(json.dumps({"run": str(run), "chat": chat, "serve": results},
                                             indent=1, default=str))
    return 1 if failed or any(r["wrong"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
