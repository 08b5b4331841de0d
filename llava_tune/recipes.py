"""The shipped recipes (configs/*/*.yaml): list them, copy one to edit, and catch the paths a
copy still has to fill in, as XTuner's `list-cfg` / `copy-cfg` habit expects.

A copy has every path of the recipe (`PATH_KEYS`) replaced by a placeholder such as
`<path to internlm2-chat-1_8b>`; `check_placeholders` refuses a config that still holds one,
naming each key and what belongs there.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_tune.config import Config, load_config
from llava_tune.errors import UserError
from llava_tune.stages import has_vision, llm_mode, vision_mode

RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The source checkout's configs/ folder (the recipes ship there, next to the package)."""
NOT_RECIPES = ("accelerate",)
"""Folders of configs/ that hold other kinds of config (accelerate launch configs)."""
MEMORY_FILE = "memory.json"
"""configs/memory.json: recipe name -> GB per GPU (scripts/estimate_memory.py's total), or a
note for the CPU recipes."""

PATH_KEYS: dict[str, str] = {
    "model.llm": "the base LLM's local folder (an InternLM2 checkpoint as downloaded, or a "
                 "transformers causal LM)",
    "model.vision.pretrained": "the vision tower's weights: a Hugging Face CLIP folder (e.g. "
                               "openai/clip-vit-large-patch14-336 as downloaded) or an "
                               "open_clip weights file",
    "model.vision.config_file": "an open_clip model config JSON (its file name is the model "
                                "name), or null for open_clip's own models",
    "data.train": "the training data: a JSON or JSONL file (LLaVA, OpenAI, XTuner or Alpaca "
                  "format), a glob or a list of them, or a mixture (README: Several files "
                  "and mixtures); or a folder of shards, read as a stream (README: Streaming "
                  "shards)",
    "data.eval": "held-out data for the validation loss (same formats), or null",
    "data.image_folder": "the folder that data.train's image paths are relative to",
    "data.cache_dir": "a folder for the tokenized-data cache, or null for no cache",
    "init_from": "the run dir of the stage this one starts from (stage 1's run_dir)",
    "run_dir": "a new folder for this run's output",
}
"""The config keys that hold paths on the recipe author's machine, and what a user puts there."""

_PLACEHOLDER = re.compile(r"<[^<>\n]+>")


def is_placeholder(value: object) -> bool:
    return isinstance(value, str) and _PLACEHOLDER.fullmatch(value.strip()) is not None


# --------------------------------------------------------------------------- the recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    """configs/NAME.yaml, e.g. "internlm2_chat_1_8b/finetune"."""
    path: Path
    config: Config
    memory: str
    """What it needs: "~13.2 GB" (GPU, estimate) or a note such as "CPU, < 2 GB"."""

    @property
    def model(self) -> str:
        """The LLM folder's name (with its quantization) and the vision tower's name."""
        model = self.config.model
        text = Path(model.llm).name + (f" ({model.quantization})" if model.quantization else "")
        if has_vision(self.config):
            text += f" + {model.vision.name}"
        return text

    @property
    def trains(self) -> str:
        """What trains: the projector, the LLM and the vision tower, each with its mode."""
        parts = ["projector"] if has_vision(self.config) else []
        llm = llm_mode(self.config)
        if llm == "lora":
            parts.append("LLM (QLoRA)" if self.config.model.quantization else "LLM (LoRA)")
        elif llm == "full":
            parts.append("LLM (full)")
        tower = vision_mode(self.config)
        if tower not in (None, "frozen"):
            parts.append(f"vision tower ({'LoRA' if tower == 'lora' else tower})")
        return ", ".join(parts)


def _recipes_dir() -> Path:
    if not RECIPES_DIR.is_dir():
        raise UserError(f"the recipes ship in the source checkout's configs/ folder, which is "
                        f"not at {RECIPES_DIR}; install llava-tune from its source folder "
                        "(pip install -e .)")
    return RECIPES_DIR


def recipe_files() -> dict[str, Path]:
    """Recipe name -> YAML file, sorted by name."""
    root = _recipes_dir()
    files = {}
    for path in sorted(root.rglob("*.yaml")):
        relative = path.relative_to(root)
        if relative.parts[0] not in NOT_RECIPES:
            files[relative.with_suffix("").as_posix()] = path
    return files


def _memory_table() -> dict[str, object]:
    path = _recipes_dir() / MEMORY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _memory(value: object) -> str:
    if isinstance(value, (int, float)):
        return f"~{value:.1f} GB"
    return "?" if value is None else str(value)


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, loaded and validated (their paths are the author's: not checked)."""
    memory = _memory_table()
    return [Recipe(name, path, load_config(path), _memory(memory.get(name)))
            for name, path in recipe_files().items()]


def find_recipe(name: str) -> Path:
    """The YAML file of recipe `name` ("internlm2_chat_1_8b/finetune"; a "configs/" prefix and
    a ".yaml" suffix are accepted)."""
    files = recipe_files()
    key = name.strip().removeprefix("configs/").removesuffix(".yaml")
    if key in files:
        return files[key]
    close = difflib.get_close_matches(key, list(files), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"no recipe named {name!r}; {hint}the recipes are: {', '.join(files)} "
                    "(`llava-tune configs` describes them)")


# --------------------------------------------------------------------------- copying


def placeholder(key: str, value: str) -> str:
    """The placeholder that replaces the recipe's `value` of path key `key`."""
    name = Path(value).name
    if key == "data.image_folder":
        return "<path to the image folder of data.train>"
    if key == "data.cache_dir":
        return "<path to a folder for the tokenized-data cache>"
    if key == "run_dir":
        return f"<path to a new run dir, e.g. runs/{name}>"
    if key == "init_from":
        return f"<path to the earlier stage's run dir, e.g. runs/{name}>"
    return f"<path to {name}>"


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


SCRIPT_PATHS_NOTE = re.compile(r"^# Paths are set by scripts/\S+ \(or override them: key=value\)\.\n",
                               re.MULTILINE)
"""A recipe's line saying which script fills in its paths: true of the shipped file, not of a
copy (its paths are placeholders), so a copy leaves it out."""

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def with_placeholders(text: str) -> tuple[str, dict[str, str]]:
    """The recipe's YAML `text` with every set path key replaced by its placeholder, comments
    and layout kept; and key -> placeholder for what was replaced."""
    data = yaml.safe_load(text) or {}
    replaced = {key: placeholder(key, value) for key, value in _flatten(data).items()
                if key in PATH_KEYS and isinstance(value, str) and value}
    expected = yaml.safe_load(text) or {}
    for key, value in replaced.items():
        _set(expected, key, value)
    lines, stack = [], []  # stack: (indent, key) of the mappings the line is inside
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            dotted = ".".join([k for _, k in stack] + [match["key"]])
            value, _, comment = match["rest"].partition(" #")
            if not value.strip():
                stack.append((indent, match["key"]))
            elif dotted in replaced:
                line = f"{match['indent']}{match['key']}: {json.dumps(replaced[dotted])}"
                line += f"  #{comment}" if comment else ""
        lines.append(line)
    edited = "\n".join(lines) + "\n"
    if yaml.safe_load(edited) != expected:
        # A layout the line editor does not follow (flow mappings, multi-line values): the
        # same content without the comments.
        edited = yaml.safe_dump(expected, sort_keys=False)
    return edited, replaced


def copy_recipe(name: str, dest: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Write recipe `name` to `dest` with its paths as placeholders; never overwrites.

    `dest` is a YAML file to create, or an existing folder (the file is then named after the
    recipe, "internlm2_chat_1_8b_finetune.yaml"). Returns the file written and key ->
    placeholder.
    """
    source = find_recipe(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / (source.relative_to(RECIPES_DIR).with_suffix("").as_posix()
                       .replace("/", "_") + ".yaml")
    if dest.exists() or dest.is_symlink():
        raise UserError(f"{dest} already exists; llava-tune configs copy never overwrites: "
                        "give a new file name, or remove it first")
    if not dest.parent.is_dir():
        raise UserError(f"cannot write {dest}: folder {dest.parent} does not exist; create it "
                        "or give another path")
    text, replaced = with_placeholders(source.read_text(encoding="utf-8"))
    text = SCRIPT_PATHS_NOTE.sub("", text)
    recipe = source.relative_to(RECIPES_DIR).with_suffix("").as_posix()
    header = (f"# Copied from llava-tune's recipe {recipe} by `llava-tune configs copy`.\n"
              "# Fill in every <...> placeholder (here, or as key=value on the command line),\n"
              f"# then: llava-tune train {dest}\n")
    try:
        with open(dest, "x", encoding="utf-8") as handle:  # "x": never replace a file
            handle.write(header + text)
    except FileExistsError:
        raise UserError(f"{dest} already exists; llava-tune configs copy never overwrites: "
                        "give a new file name, or remove it first") from None
    except OSError as err:
        raise UserError(f"cannot write {dest} ({err.strerror or err}); give a path in a "
                        "folder you can write to") from err
    return dest, replaced


# --------------------------------------------------------------------------- at train time


def unfilled_placeholders(config: Config) -> dict[str, str]:
    """Dotted key -> placeholder, for every value of `config` that is still a placeholder."""
    return {key: value for key, value in _flatten(dataclasses.asdict(config)).items()
            if is_placeholder(value)}


def check_placeholders(config: Config, source: str | os.PathLike | None = None) -> None:
    """Raise one UserError naming every placeholder left in `config` and what to put there."""
    unfilled = unfilled_placeholders(config)
    if not unfilled:
        return
    where = f"{source} still has" if source is not None else "the config still has"
    lines = [f"  {key}: {value} -> {PATH_KEYS.get(key, 'a value for this key')}"
             for key, value in unfilled.items()]
    example = next(iter(unfilled))
    raise UserError(
        f"{where} {len(unfilled)} placeholder{'s' if len(unfilled) > 1 else ''} to fill in:\n"
        + "\n".join(lines)
        + f"\nedit the file, or set them on the command line (e.g. {example}=...)")
