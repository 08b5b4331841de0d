"""MMBench-format multiple-choice evaluation: read the TSV, ask, extract the letter, score.

The model is a callable (messages, images) -> answer text, so everything here runs and is
tested without a model; `llava-tune eval --mmbench` wires a real one on top.

What this follows (checked against XTuner's `xtuner/tools/mmbench.py` and VLMEvalKit):
- TSV: tab-separated, a header row, one question per row. Columns `index`, `question`,
  `hint`, `A`, `B`, `C`, `D` (any single capital letter is an option column; empty = no such
  option), `answer` (absent in test splits), `category`, `l2-category`, `image` (base64 of an
  encoded image, or, to save space, the `index` of another row whose image it shares; XTuner
  follows the reference when the field is shorter than 16 characters, VLMEvalKit when it is
  64 or fewer; here: 64 or fewer characters holding an integer).
- Prompt (XTuner): `<image>\\n`, the hint and a newline when there is one, the question and a
  newline, one line `X. option` per option, then "Answer with the option's letter from the
  given choices directly." (the Chinese instruction when the text holds CJK characters).
- CircularEval: a question counts as right only if it is answered right with its options
  rotated through every position. MMBench's own files may already hold the rotated copies:
  rows with `index >= 1_000_000`, a question being all rows with equal `index % 1_000_000`
  (XTuner and VLMEvalKit group that way). See `plan_passes` for which case applies when.

Differences, on purpose: only empty fields count as missing (pandas, which both tools use,
also reads "None", "NA" or "nan" as missing, dropping such an option); and the letter is
extracted with `extract_letter` (XTuner takes the first capital A-D anywhere in the answer,
so "Answer: C" counts as A).
"""


from llava_tune.inference.mmbench.answers import (
    build_messages,
    build_prompt,
    extract_letter,
    rotate_options,
)
from llava_tune.inference.mmbench.evaluate import (
    evaluate_mmbench,
    evaluate_mmbench_batched,
    plan_passes,
)
from llava_tune.inference.mmbench.results import (
    MMBenchResult,
    Score,
    output_paths,
    score_predictions,
)
from llava_tune.inference.mmbench.tsv import CIRCULAR_OFFSET, MMBenchImageError, MMBenchTSV

__all__ = [
    "CIRCULAR_OFFSET", "MMBenchImageError", "MMBenchResult", "MMBenchTSV", "Score",
    "build_messages", "build_prompt", "evaluate_mmbench", "evaluate_mmbench_batched",
    "extract_letter", "output_paths", "plan_passes", "rotate_options", "score_predictions",
]
