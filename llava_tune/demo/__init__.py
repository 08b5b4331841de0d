"""The embedded demo: generated shapes images and questions, a tiny byte-fallback tokenizer, a
tiny InternLM2-architecture LM and ViT, all made on the CPU without downloads.

`python -m llava_tune.demo OUT_DIR` writes everything the demo trains from (see make.py);
scripts/demo.sh runs the whole pipeline on it. The data's rules are in data/SHAPES.md.
"""
