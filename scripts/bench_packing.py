"""Measure what packing buys: real (unpadded) training tokens per second with and without.

    python scripts/bench_packing.py LLM_DIR DATA_FILE [--config C] [--steps 30] [key=value ...]

Trains the same config twice for --steps steps (data.pack=false, then true) in a temp dir and
prints the tokens/s that each run logged (metrics.jsonl counts only real tokens), skipping
the first logged window as warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from llava_tune.cli import quiet_libraries
from llava_tune.config import load_config
from llava_tune.training import train

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(config_file: Path, overrides: list[str]) -> float:
    config = load_config(config_file, overrides)
    train(config)
    lines = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_s"] for line in lines][1:] or [0.0]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llm")
    parser.add_argument("data")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo/sft.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for pack in (False, True):
            overrides = [f"model.llm={args.llm}", f"data.train={args.data}",
                         f"run_dir={tmp}/pack-{pack}", f"train.max_steps={args.steps}",
                         "train.log_every=5", f"data.pack={str(pack).lower()}", *args.overrides]
            results[pack] = tokens_per_second(args.config, overrides)
            print(f"pack={str(pack).lower():5s} {results[pack]:10.1f} real tokens/s")
    print(f"speed-up from packing: {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
