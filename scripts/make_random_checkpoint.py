"""A random-init InternLM2 checkpoint in the hub's layout (see llava_tune/demo/random_checkpoint.py).

    python scripts/make_random_checkpoint.py --like internlm2-chat-1_8b|internlm2-chat-7b OUT \
        [--tokenizer ../shared/fixtures/internlm2-tokenizer]
"""

import sys

from llava_tune.demo.random_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
