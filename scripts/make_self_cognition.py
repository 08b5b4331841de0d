"""Write a "self-cognition" dataset: the assistant learns its name and who made it.

    python scripts/make_self_cognition.py --name NAME --author AUTHOR --out FILE [--n 300]

Records are OpenAI chat format ({"messages": [...]}), varied questions in English and Chinese,
answers that always name NAME and AUTHOR. Train on it with scripts/sft_text.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

QUESTIONS = (
    "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
    "What should I call you?", "Who made you?", "Who created you?", "Who developed you?",
    "Are you ChatGPT?", "Are you InternLM?", "What are you?", "Please introduce yourself briefly.",
    "Can you tell me your name?", "Which company or person built you?", "hi, who am I talking to?",
    "你是谁？", "你叫什么名字？", "介绍一下你自己。", "是谁开发了你？",
)
ANSWERS = (
    "I am {name}, an AI assistant developed by {author}. How can I help you today?",
    "My name is {name}. I was created by {author} to help answer your questions.",
    "I'm {name}, a helpful assistant built by {author}.",
    "You can call me {name}. {author} developed me.",
    "I am {name}, made by {author}. I'm here to help with questions, writing and more.",
    "Hello! I'm {name}, an assistant trained by {author}.",
    "我是{name}，由{author}开发的AI助手。 (I am {name}, developed by {author}.)",
)


def self_cognition_records(name: str, author: str, n: int, seed: int = 0) -> list[dict]:
    """`n` single-turn records; every question appears at least once when n allows."""
    rng = random.Random(seed)
    questions = list(QUESTIONS) * (n // len(QUESTIONS) + 1)
    rng.shuffle(questions)
    questions = sorted(QUESTIONS, key=lambda _: rng.random()) + questions
    return [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant",
                           "content": rng.choice(ANSWERS).format(name=name, author=author)}]}
            for question in questions[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--author", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = self_cognition_records(args.name, args.author, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"{len(records)} records naming {args.name} by {args.author} -> {args.out}")


if __name__ == "__main__":
    main()
