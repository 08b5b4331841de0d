"""`python -m llava_tune.demo OUT_DIR`: write the demo's data, tokenizer, LM and ViT."""

import sys

from llava_tune.demo.make import main

sys.exit(main())
