"""Stage dpo: preference files read and checked, pairs tokenized, trained on the one engine
from a finetune run (reference precomputed or live), and the run used like any other.
The loss itself against TRL's DPOTrainer: test_dpo_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import LOGGED, run_cli, tiny_model

from llava_tune.assembly.model import load_run
from llava_tune.cli import main
from llava_tune.config import load_config
from llava_tune.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.formats import read_conversations
from llava_tune.data.image import load_image
from llava_tune.data.template import INTERNLM2_CHAT, expand_image_slots
from llava_tune.data.tokenize import tokenize_pair
from llava_tune.demo.pairs import pairs_of, rejected_answer
from llava_tune.errors import UserError
from llava_tune.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DPO = REPO / "configs" / "demo" / "dpo.yaml"


def write(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- reading


def test_every_preference_form_reads_to_the_same_record(tmp_path):
    """TRL's plain and conversational forms (image parts in the prompt), the implicit prompt,
    and RLAIF-V's flat form (an image without a marker gets one)."""
    question = "What color is the shape?"
    records = [
        {"prompt": f"{IMAGE_TOKEN}\n{question}", "chosen": "It is red.", "rejected": "It is blue.",
         "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": f"\n{question}"}]}],
         "chosen": [{"role": "assistant", "content": "It is red."}],
         "rejected": [{"role": "assistant", "content": "It is blue."}], "images": ["a.png"]},
        {"chosen": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"},
                    {"role": "assistant", "content": "It is red."}],
         "rejected": [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"},
                      {"role": "assistant", "content": "It is blue."}], "image": "a.png"},
        {"image": "a.png", "question": question, "chosen": "It is red.", "rejected": "It is blue."},
    ]
    result = read_conversations(write(tmp_path / "pairs.jsonl", records))
    assert result.problems == []
    for record in result.records:
        assert record["messages"] == [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"},
                                      {"role": "assistant", "content": "It is red."}]
        assert record["rejected"] == "It is blue." and record["images"] == ["a.png"]


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}, "are the same"),
    ({"prompt": "Hi?", "chosen": "Hello."}, "no 'rejected'"),
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": ""}, "empty chosen or rejected"),
    ({"prompt": f"{IMAGE_TOKEN}{IMAGE_TOKEN} Same?", "chosen": "Yes.", "rejected": "No.",
      "images": ["a.png"]}, "2 <image> marker(s) but 1 image(s)"),
    ({"chosen": "Hello.", "rejected": "Bye."}, "has no 'prompt'"),
    ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": "y"}], "rejected": "z"},
     "must be the answer"),
])
def test_bad_pairs_name_file_record_and_problem(tmp_path, record, fragment):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    path = write(tmp_path / "pairs.jsonl", [good, {"id": "p1", **record}])
    result = read_conversations(path)
    assert len(result.records) == 1 and len(result.problems) == 1
    message = str(result.problems[0])
    assert f"{path} record 1 (id 'p1')" in message and fragment in message, message


def test_a_pair_learns_from_its_last_answer_only(tok):
    """Both sequences start with the same prompt tokens; labels cover the final answer only,
    never an earlier answer of the conversation."""
    record = {"messages": [{"role": "user", "content": "Who are you?"},
                           {"role": "assistant", "content": "I am Nova."},
                           {"role": "user", "content": "Who made you?"},
                           {"role": "assistant", "content": "Ada made me."}],
              "rejected": "Nobody made me."}
    chosen, rejected = tokenize_pair(record, tok, INTERNLM2_CHAT, 512)
    prompt = INTERNLM2_CHAT.prompt_ids(record["messages"][:-1], tok)
    for side, answer in ((chosen, "Ada made me."), (rejected, "Nobody made me.")):
        assert side.input_ids[:len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in side.labels[:len(prompt)])
        learned = [t for t in side.labels if t != IGNORE_INDEX]
        assert answer in tok.decode(learned) and "Nova" not in tok.decode(learned)
    # Cut so that the final answer is gone but the first is still there: no pair.
    cut = tokenize_pair(record, tok, INTERNLM2_CHAT, len(prompt) - 8)
    assert cut[0].status == cut[1].status == "no answer within max_length"


# --------------------------------------------------------------------------- data sets


def pair_files(folder: Path, shapes_data: Path) -> tuple[Path, Path]:
    """Demo pairs about the fixture's shapes: train (every finetune question) and held-out."""
    finetune = json.loads((shapes_data / "finetune.json").read_text())
    heldout = json.loads((shapes_data / "heldout.json").read_text())
    return (write(folder / "pairs_train.jsonl", pairs_of(finetune, "train", 0)),
            write(folder / "pairs_heldout.jsonl", pairs_of(heldout, "heldout", 0)))


def test_demo_pairs_reject_with_a_wrong_color_shape_or_extra_object():
    import random

    rng = random.Random(0)
    assert rejected_answer("It is red.", "color", rng) not in ("It is red.",)
    assert rejected_answer("It is red.", "color", rng).startswith("It is ")
    wrong_shape = rejected_answer("It is a star.", "shape", rng)
    assert wrong_shape.startswith("It is a ") and "star" not in wrong_shape
    extra = rejected_answer("It is a star.", "extra object", rng)
    assert extra.startswith("It is a star, beside a small ")


def test_a_stage_refuses_the_other_kind_of_data(tmp_path, shapes_data, image_tok):
    pairs, _ = pair_files(tmp_path, shapes_data)
    with pytest.raises(UserError, match="holds preference pairs .* stage: dpo"):
        ConversationDataset(pairs, image_tok, INTERNLM2_CHAT, 128, shapes_data / "images")
    with pytest.raises(UserError, match="holds conversations .* stage dpo trains on preference"):
        ConversationDataset(shapes_data / "finetune.json", image_tok, INTERNLM2_CHAT, 128,
                            shapes_data / "images", preference=True)


def test_a_pair_batch_holds_chosen_rows_then_rejected_rows_and_the_images_once(tok):
    collate = Collator(tok.pad_token_id, preference=True)
    items = [{"id": str(i), "input_ids": torch.arange(3 + i), "labels": torch.arange(3 + i),
              "rejected_input_ids": torch.arange(5), "rejected_labels": torch.arange(5),
              "pixel_values": torch.full((1, 3, 4, 4), float(i)), "row": i}
             for i in range(2)]
    batch = collate([*items, {"id": "bad", "error": "image x.png does not decode"}])
    assert batch.pairs == 2 and batch.num_pairs == 2 and batch.loss_units == 2
    assert batch.input_ids.shape == (4, 5) and batch.attention_mask[:, :].sum(1).tolist() == [3, 4, 5, 5]
    assert batch.pixel_values.shape[0] == 2 and batch.rows == [0, 1]
    assert batch.skipped == [("bad", "image x.png does not decode")]
    empty = collate([{"id": "bad", "error": "no"}])  # every pair failed: a stand-in, no loss
    assert empty.pairs == 1 and empty.num_pairs == 0


def test_config_problems_of_stage_dpo_are_reported_together(tmp_path):
    with pytest.raises(UserError) as caught:
        load_config(DPO, ["dpo.loss=kto", "dpo.beta=0", "dpo.label_smoothing=0.7",
                          "data.pack=true", "dpo.reference=live", "train.llm=full",
                          "model.quantization=null"])
    message = str(caught.value)
    for fragment in ("dpo.loss='kto'", "dpo.beta=0", "dpo.label_smoothing=0.7",
                     "data.pack in stage dpo", "dpo.reference=live with train.llm=full"):
        assert fragment in message, fragment
    with pytest.raises(UserError, match="model.images=True in stage sft"):
        load_config(REPO / "configs" / "demo" / "sft.yaml", ["model.images=true"])


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_lm, tiny_vision, shapes_data, tiny_finetune_run):
    """A dpo run from the session's finetune run: 3 steps on the demo's pairs, the held-out
    pairs evaluated at the end, the reference precomputed into data.cache_dir."""
    folder = tmp_path_factory.mktemp("dpo")
    train, heldout = pair_files(folder, shapes_data)
    run = folder / "dpo"
    args = dpo_args(tiny_lm, tiny_vision, shapes_data, run, tiny_finetune_run, train,
                    f"data.eval={heldout}", f"data.cache_dir={folder / 'cache'}")
    assert main(args) == 0
    return run, args


def dpo_args(tiny_lm, tiny_vision, shapes_data, run, init, train, *extra) -> list[str]:
    return ["train", str(DPO), *tiny_model(tiny_lm, tiny_vision), f"init_from={init}",
            f"data.train={train}", "data.eval=null", f"data.image_folder={shapes_data / 'images'}",
            f"run_dir={run}", *LOGGED, "data.max_length=128", "train.max_steps=3", *extra]


def test_dpo_trains_from_a_finetune_run_and_reports_rewards(dpo_run):
    run, _ = dpo_run
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margin",
                "rewards/accuracy"} <= row.keys()
    # Step 1 trains from the reference itself: every reward is 0, the DPO loss log(2) (plus
    # the SFT term: a mean token NLL, above 0).
    assert steps[0]["rewards/chosen"] == steps[0]["rewards/rejected"] == 0.0
    assert steps[0]["loss"] > 0.6931
    final = [r for r in rows if "eval_loss" in r][-1]
    assert 0.0 <= final["eval_rewards/accuracy"] <= 1.0
    assert (run / "projector").is_dir() and (run / "llm_adapter").is_dir()
    assert load_config(run / "config.yaml").model.images is True
    assert (run / "loss.png").is_file()


def test_the_reference_is_read_back_and_recomputed_for_other_data(dpo_run, tmp_path, capsys):
    run, args = dpo_run
    again = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={tmp_path / 'again'}"]
    capsys.readouterr()
    assert main([*again]) == 0
    err = capsys.readouterr().err
    assert "pairs read back" in err and "computed now" not in err
    # Read back or computed, the run trains alike: the pass draws no random numbers and
    # leaves bitsandbytes' CPU kernels as they were (training/preference.py: _eval).
    losses = [[(r["loss"], r["rewards/margin"]) for r in read_metrics(folder / "metrics.jsonl")
               if "loss" in r] for folder in (run, tmp_path / "again")]
    assert losses[0] == losses[1]

    # The same records in another file: another prepared table, so another reference.
    train = Path(next(a for a in args if a.startswith("data.train=")).split("=", 1)[1])
    copy = tmp_path / "copy.jsonl"
    copy.write_text(train.read_text())
    assert main([*again, f"data.train={copy}", f"run_dir={tmp_path / 'other'}",
                 "train.max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "computed now" in err


def test_precomputed_and_live_references_train_alike(tmp_path, tiny_lm, tiny_vision,
                                                     shapes_data, tiny_finetune_run):
    train, _ = pair_files(tmp_path, shapes_data)
    losses = {}
    for reference in ("precompute", "live"):
        run = tmp_path / reference
        assert main(dpo_args(tiny_lm, tiny_vision, shapes_data, run, tiny_finetune_run, train,
                             f"dpo.reference={reference}", "train.max_steps=2")) == 0
        losses[reference] = [value for r in read_metrics(run / "metrics.jsonl") if "loss" in r
                             for value in (r["loss"], r["rewards/margin"])]
    assert losses["precompute"] == pytest.approx(losses["live"], rel=1e-4, abs=1e-5)
    assert losses["live"][3] != 0.0  # the second step's rewards moved off the reference


def test_a_pair_scores_its_answers_as_the_finetune_forward_does(tiny_finetune_run,
                                                                shapes_data, tmp_path):
    """The pair forward (images once, their tokens repeated for the rejected rows) gives each
    answer the log-probability the finetune forward's loss gives it alone."""
    bundle = load_run(tiny_finetune_run)
    train, _ = pair_files(tmp_path, shapes_data)
    dataset = ConversationDataset(train, bundle.tokenizer, bundle.template, 128,
                                  shapes_data / "images", bundle.image_processor,
                                  bundle.model.layout, preference=True)
    items = [dataset[i] for i in range(3)]
    model = bundle.model.eval()
    with torch.no_grad():
        pair = Collator(bundle.tokenizer.pad_token_id, preference=True)(items)
        out = model(**pair.model_inputs(), image_repeats=2, per_sequence=True)
        for i, item in enumerate(items):
            for row, (ids, labels) in ((i, ("input_ids", "labels")),
                                       (i + 3, ("rejected_input_ids", "rejected_labels"))):
                alone = Collator(bundle.tokenizer.pad_token_id)([
                    {"id": item["id"], "input_ids": item[ids], "labels": item[labels],
                     "pixel_values": item["pixel_values"]}])
                loss = model(**alone.model_inputs()).loss_sum
                torch.testing.assert_close(out.logps[row], -loss, rtol=1e-5, atol=1e-5)


def test_a_dpo_run_chats_evaluates_and_exports_like_a_finetune_run(dpo_run, shapes_data,
                                                                   tmp_path, capsys):
    run, _ = dpo_run
    image = shapes_data / "images" / "heldout" / "000000.png"
    code, out, _ = run_cli(capsys, "chat", run, "--image", image, "--max-new-tokens", "4",
                           "--question", "What color is the shape?")
    assert code == 0 and out.strip()
    code, _, _ = run_cli(capsys, "eval", run, "--data", shapes_data / "heldout.json",
                         "--image-folder", shapes_data / "images", "--max-new-tokens", "4",
                         "--json", tmp_path / "accuracy.json")
    assert code == 0 and "accuracy" in json.loads((tmp_path / "accuracy.json").read_text())
    for fmt in ("hf-llava", "xtuner", "internlm2"):
        code, _, err = run_cli(capsys, "export", run, tmp_path / fmt, "--format", fmt)
        assert code == 0, err
    # XTuner's layout imports back to the same model.
    config = load_config(run / "config.yaml")
    vision = ["--vision", "tiny-vit", "--vision-weights", config.model.vision.pretrained,
              "--vision-config", config.model.vision.config_file]
    code, _, err = run_cli(capsys, "import-xtuner", tmp_path / "xtuner", tmp_path / "back",
                           "--llm", config.model.llm, *vision)
    assert code == 0, err
    logits = []
    for folder in (run, tmp_path / "back"):
        bundle = load_run(folder, quantization=None)
        ids = bundle.template.prompt_ids([{"role": "user", "content": f"{IMAGE_TOKEN}\nHi?"}],
                                         bundle.tokenizer)
        expanded, _ = expand_image_slots(ids, None, bundle.tokenizer.convert_tokens_to_ids(
            IMAGE_TOKEN), bundle.model.vision.num_patches)  # a pad image: the tower's patches
        with torch.no_grad():
            logits.append(bundle.model.eval().logits(
                torch.tensor([expanded]), bundle.image_processor(load_image(image))))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_text_only_dpo_from_an_sft_run(tmp_path, tiny_lm, capsys):
    """An sft run's dpo has no vision tower (model.images resolves to false and is
    recorded), and chats as text; without init_from a warning names the reference."""
    records = [{"messages": [{"role": "user", "content": "Who are you?"},
                             {"role": "assistant", "content": "I am Nova."}]}] * 8
    text = write(tmp_path / "text.jsonl", records)
    sft = tmp_path / "sft"
    assert main(["train", str(REPO / "configs" / "demo" / "sft.yaml"), f"model.llm={tiny_lm}",
                 f"data.train={text}", f"run_dir={sft}", *LOGGED, "train.max_steps=2"]) == 0
    pairs = write(tmp_path / "pairs.jsonl", [
        {"prompt": "Who are you?", "chosen": "I am Nova.", "rejected": "I am a cat."},
        {"prompt": [{"role": "user", "content": "Who made you?"}], "chosen": "Ada Lab.",
         "rejected": "Nobody."}] * 4)
    run = tmp_path / "dpo"
    capsys.readouterr()
    assert main(["train", str(DPO), f"model.llm={tiny_lm}", f"init_from={sft}",
                 f"data.train={pairs}", "data.eval=null", f"run_dir={run}", *LOGGED,
                 "train.max_steps=2", "model.quantization=null", "train.lora.r=32",
                 "train.lora.alpha=64"]) == 0
    assert load_config(run / "config.yaml").model.images is False
    assert not (run / "projector").exists() and (run / "llm_adapter").is_dir()
    code, out, _ = run_cli(capsys, "chat", run, "--max-new-tokens", "3",
                           "--question", "Who are you?")
    assert code == 0 and out.strip()
    assert main(["train", str(DPO), f"model.llm={tiny_lm}", "model.images=false",
                 f"data.train={pairs}", "data.eval=null", f"run_dir={tmp_path / 'base'}",
                 "init_from=null", *LOGGED, "train.max_steps=1", "model.quantization=null"]) == 0
    assert "stage dpo without init_from" in capsys.readouterr().err
