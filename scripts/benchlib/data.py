"""The benchmark's inputs, built once under --work and shared by both systems: the sizes, the
data (demo shapes or the LLaVA-like mix), the models, the finetune starting point and its
hf-llava export (Setup), and our ConversationDataset as both systems see it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_tune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

VIT_L_336 = "ViT-L-14-336-quickgelu"
"""open_clip config whose shapes the 1_8b size's random vision tower takes."""


@dataclass(frozen=True)
class Size:
    config: str
    """Our finetune config for this size, relative to the repository."""
    image_size: dict[str, int]
    """Generated images' side (demo) or long side (mix), per --data."""
    max_length: dict[str, int]
    """data.max_length per --data."""
    gpu_only: bool = False


SIZES = {
    "demo": Size("configs/demo/finetune.yaml", {"demo": 112, "mix": 160, "anyres": 64},
                 {"demo": 128, "mix": 1024, "anyres": 256}),
    "1_8b": Size("configs/internlm2_chat_1_8b/finetune.yaml", {"demo": 336, "mix": 640, "anyres": 336},
                 {"demo": 2048, "mix": 2048, "anyres": 4096}, gpu_only=True),
}

ANYRES_GRIDS = [[1, 4], [4, 1], [2, 2]]
"""--data anyres: the grids ([rows, cols] of tower-sized tiles) both systems cut the images
into; the detail scenes are exactly these shapes (4:1, 1:4 and 2 x 2 tower sides)."""


def data_overrides(kind: str) -> list[str]:
    """What --data KIND changes in our config, for both systems (anyres: the tiles)."""
    if kind == "anyres":
        return ["model.image_aspect=anyres",
                f"model.anyres.grid_pinpoints={json.dumps(ANYRES_GRIDS, separators=(',', ':'))}"]
    return []


@dataclass
class Setup:
    """What both systems share: our config file, the models, the data and the work folder."""

    config: Path
    llm: Path
    vision_name: str
    vision_config: Path | None
    vision_weights: Path
    data: Path
    image_folder: Path
    max_length: int
    work: Path
    """Holds cache/ (tokenized data, InternLM2 conversions), start/ (the starting point),
    hf-llava/ or hf-llava-next/ (its export) and runs/."""
    extra: tuple[str, ...] = ()
    """data_overrides(--data): the image reading both systems share."""
    peer_sampling: str = "random"
    """The HF Trainer's train_sampling_strategy (random or group_by_length); ours groups by
    length when the peer does (--ours-override changes it)."""

    def overrides(self) -> list[str]:
        """key=value pairs that point our config at this setup, for both systems."""
        items = [f"model.llm={self.llm}", f"model.vision.name={self.vision_name}",
                 f"model.vision.pretrained={self.vision_weights}",
                 f"data.train={self.data}", f"data.image_folder={self.image_folder}",
                 f"data.max_length={self.max_length}", f"data.cache_dir={self.work / 'cache'}",
                 "train.lora.dropout=0", "train.grad_accum=1", "train.save_every=null",
                 # The peer freezes the tower and samples as --peer-sampling: so do we here.
                 "train.vision=frozen",
                 f"data.group_by_length={self.peer_sampling == 'group_by_length'}"]
        if self.vision_config is not None:
            items.append(f"model.vision.config_file={self.vision_config}")
        return items + list(self.extra)

    @property
    def start(self) -> Path:
        return self.work / "start"

    @property
    def export_format(self) -> str:
        """Tiles go to transformers' LlavaNext, one square per image to its Llava."""
        return "hf-llava-next" if "model.image_aspect=anyres" in self.extra else "hf-llava"

    @property
    def export(self) -> Path:
        return self.work / self.export_format


# --------------------------------------------------------------------------- building inputs


def _texts(files: list[Path]) -> list[str]:
    from llava_tune.demo import tokenizer as demo_tokenizer

    return [t for f in files for t in demo_tokenizer.llava_texts(json.loads(f.read_text()))]


def prepare_data(kind: str, size: str, work: Path, records: int,
                 seed: int) -> tuple[Path, Path, list[Path]]:
    """Generate the data once: (data file, image folder, the files the tokenizer learns from)."""
    image_size = SIZES[size].image_size[kind]
    out = work / "data" / f"{kind}-{image_size}px-{records}-seed{seed}"
    if kind == "demo":
        from llava_tune.demo import shapes

        data = out / "finetune.json"
        if not (out / ".complete").is_file():
            shapes.generate(out, n_train=math.ceil(records / 2), n_heldout=0, seed=seed,
                            image_size=image_size)
            (out / ".complete").touch()
        return data, out / "images", [out / "text.json", data]
    if kind == "anyres":
        from llava_tune.demo import scenes

        # Wide, tall and square images of exactly the grids' shapes, so every image is cut
        # into 4 tiles plus its overview (5 tower inputs, 5 x the tokens of pad).
        sizes = [(cols * image_size, rows * image_size) for rows, cols in ANYRES_GRIDS]
        if not (out / ".complete").is_file():
            scenes.write_detail(out, math.ceil(records / 2), 0, seed, sizes=sizes)
            (out / ".complete").touch()
        data = out / "detail_train.json"  # two records per image, images under out/
        return data, out, [data]
    if kind == "mix":
        from llava_tune.demo import mix

        if not (out / ".complete").is_file():
            mix.generate_mix(out, records, seed, image_size)
            (out / ".complete").touch()
        return out / "mix.json", out / "images", [out / "mix.json"]
    raise UserError(f"--data {kind!r}: use demo, mix or anyres")


REAL_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "internlm2-tokenizer"
"""InternLM2's own tokenizer (--vocab real), where the project's shared folder is."""


def prepare(size: str, kind: str, work: Path, records: int = 2000, seed: int = 0,
            vocab: str = "demo", peer_sampling: str = "random") -> Setup:
    """Data, models, the starting point and its hf-llava export for --size/--data (and
    --vocab), built once under work/SIZE-KIND... and reused. --vocab real: the demo's small
    LM layers with InternLM2's real tokenizer and its 92,544-word vocabulary, so the LM head
    is a real model's size."""
    data, images, text_files = prepare_data(kind, size, work, records, seed)
    if vocab == "real" and not (REAL_TOKENIZER / "tokenizer.model").is_file():
        raise UserError(f"--vocab real needs InternLM2's tokenizer in {REAL_TOKENIZER} "
                        "(the project's shared fixtures); it is not there")
    if vocab == "real" and size != "demo":
        raise UserError("--vocab real is for --size demo (--size 1_8b has the real vocabulary)")
    home = work / f"{size}-{kind}-{records}-seed{seed}{'-realvocab' if vocab == 'real' else ''}"
    models = home / "models"
    if not (models / ".complete").is_file():
        from llava_tune.demo import make as make_demo

        shutil.rmtree(models, ignore_errors=True)
        if size == "demo":
            make_demo.make_lm(models / "lm", text_files, seed,
                              tokenizer=REAL_TOKENIZER if vocab == "real" else None)
            make_demo.make_vision(models / "vision", seed)
        else:
            from llava_tune.convert.open_clip_format import read_model_config
            from llava_tune.demo import tokenizer as demo_tokenizer
            from llava_tune.demo.random_checkpoint import write_checkpoint

            # 768 pieces: the mix's words then take about as many tokens as InternLM2's own
            # tokenizer gives them (measured: 1.15x), so sequence lengths are realistic.
            tok = demo_tokenizer.train_tokenizer(_texts(text_files), models / "tokenizer", 768)
            write_checkpoint("internlm2-chat-1_8b", models / "lm", tokenizer=tok, seed=seed)
            make_demo.make_vision(models / "vision", seed, config=read_model_config(VIT_L_336),
                                  name="bench-vit-l-14-336")
        (models / ".complete").touch()
    name = "demo-vit" if size == "demo" else "bench-vit-l-14-336"
    setup = Setup(config=ROOT / SIZES[size].config, llm=models / "lm", vision_name=name,
                  vision_config=models / "vision" / f"{name}.json",
                  vision_weights=models / "vision" / f"{name}.safetensors", data=data,
                  image_folder=images, max_length=SIZES[size].max_length[kind], work=home,
                  extra=tuple(data_overrides(kind)), peer_sampling=peer_sampling)
    prepare_start(setup)
    return setup


@contextlib.contextmanager
def environment(**values: str):
    """These environment variables for the block, the previous values after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prepare_start(setup: Setup) -> None:
    """The finetune stage's starting point (base LLM + the seeded random projector after one
    pretrain step at lr 1e-12, which leaves it as it was; lr 0 is not a valid config) and its
    hf-llava (hf-llava-next for tiles) export, for the peer to load. Both systems start from
    this run's weights."""
    marker = setup.work / ".start-complete"
    if marker.is_file():
        return
    from llava_tune.cli import main as cli

    shutil.rmtree(setup.start, ignore_errors=True)
    shutil.rmtree(setup.export, ignore_errors=True)
    overrides = setup.overrides() + [
        "stage=pretrain", "init_from=null", "train.llm=frozen", "model.quantization=null",
        "train.max_steps=1", "train.lr=1e-12", "train.batch_size=1", "train.log_every=1",
        "train.gradient_checkpointing=false", "data.num_workers=0", f"run_dir={setup.start}"]
    with environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
        if cli(["train", str(setup.config), *overrides]) != 0:
            raise RuntimeError(f"the starting-point run {setup.start} failed (see above)")
        if cli(["export", str(setup.start), str(setup.export), "--format",
                setup.export_format]) != 0:
            raise RuntimeError(f"exporting {setup.start} as {setup.export_format} failed (see above)")
    _free_memory()
    marker.touch()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the shared dataset


def our_config(config_file: Path, overrides: list[str]):
    from llava_tune.config import load_config

    return load_config(config_file, overrides)


def shared_dataset(config, export: Path):
    """Our ConversationDataset for `config`, as our trainer builds it (same tokenizer,
    template, max_length, image processing and image slots), its settings read from the
    hf-llava export so that no vision tower has to load. Returns (dataset, image token id of
    the Llava model, pad id)."""
    from llava_tune.assembly.llm import load_tokenizer
    from llava_tune.data.datasets import ConversationDataset
    from llava_tune.data.image import ImageProcessor
    from llava_tune.data.template import ChatTemplate, add_image_token, get_template
    from llava_tune.models.anyres import ImageLayout

    llava = json.loads((export / "config.json").read_text())
    pre = json.loads((export / "preprocessor_config.json").read_text()) \
        if (export / "preprocessor_config.json").is_file() \
        else json.loads((export / "processor_config.json").read_text())["image_processor"]
    tokenizer = load_tokenizer(config.model.llm)
    add_image_token(tokenizer)  # as the trainer's model build does for stages with images
    template = get_template(config.model.template)
    if config.model.system:
        template = ChatTemplate(**{**template.__dict__, "default_system": config.model.system})
    side = pre["crop_size"]["height"]
    if llava["model_type"] == "llava_next":
        # The export's pinpoints are pixels; ours are tiles of the tower's side.
        vision = llava["vision_config"]
        layout = ImageLayout(side, vision["image_size"] // vision["patch_size"], tuple(
            (h // side, w // side) for h, w in llava["image_grid_pinpoints"]))
    else:
        layout = ImageLayout(side, math.isqrt(llava["image_seq_length"]))
    processor = ImageProcessor(side, pre["image_mean"], pre["image_std"], layout)
    dataset = ConversationDataset(
        config.data.train, tokenizer, template, config.data.max_length,
        image_folder=config.data.image_folder, image_processor=processor, layout=layout,
        max_bad_fraction=config.data.max_bad_fraction,
        cache_dir=config.data.cache_dir)
    image_token_id = llava.get("image_token_id", llava.get("image_token_index"))
    return dataset, image_token_id, tokenizer.pad_token_id


def data_stats(setup: Setup) -> dict[str, Any]:
    """Samples, real tokens per sample (images expanded) and the text-only share."""
    with environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
        dataset, _, _ = shared_dataset(our_config(setup.config, setup.overrides()), setup.export)
    lengths = dataset.lengths()
    images = dataset.table["images"]
    return {"file": str(setup.data), "samples": len(lengths),
            "mean_tokens": round(statistics.fmean(lengths), 2), "max_tokens": max(lengths),
            "text_only_fraction": round(sum(not i for i in images) / len(images), 4),
            "truncated": dataset.report.truncated, "max_length": setup.max_length}



def first_records(data: Path, n: int, out: Path) -> Path:
    """The first `n` records of `data`, as their own file beside the others' work."""
    from llava_tune.data.formats import read_json_records

    records, _ = read_json_records(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records[:n], indent=1))
    return out

