"""`python -m llava_tune ...` is `llava-tune ...` (and what torchrun runs:
`torchrun --standalone --nproc_per_node 2 -m llava_tune train CONFIG`)."""

import sys

from llava_tune.cli import main

sys.exit(main())
