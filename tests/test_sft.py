"""Text-only fine-tuning: the four data formats, packing, and image/text mixed batches."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_tune.assembly.llm import load_llm
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset, PackedDataset, pack_groups
from llava_tune.data.formats import read_conversations
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.models.attention import segmented_attention, use_segmented_attention
from llava_tune.models.llava import LlavaModel
from llava_tune.training.setup import compile_layers

REPO = Path(__file__).resolve().parents[1]
EXPECTED = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Nova."},
            {"role": "user", "content": "Who made you?"},
            {"role": "assistant", "content": "Ada made me."}]


def write(path: Path, records: list, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_every_format_reads_to_the_same_messages(tmp_path, jsonl):
    files = {
        "openai": [{"messages": EXPECTED}],
        "xtuner": [{"conversation": [
            {"system": "Be kind.", "input": "Who are you?", "output": "I am Nova."},
            {"input": "Who made you?", "output": "Ada made me."}]}],
        "llava": [{"id": "x", "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Nova."},
            {"from": "human", "value": "Who made you?"}, {"from": "gpt", "value": "Ada made me."}]}],
    }
    for name, records in files.items():
        result = read_conversations(write(tmp_path / f"{name}.json", records, jsonl))
        assert result.problems == []
        assert result.records[0]["messages"] == EXPECTED, name
        assert result.records[0]["images"] == []


def test_alpaca_joins_instruction_and_input(tmp_path):
    records = [{"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
               {"instruction": "Say hi.", "input": "", "output": "Hi", "system": "Be kind."}]
    result = read_conversations(write(tmp_path / "a.json", records))
    assert result.records[0]["messages"] == [
        {"role": "user", "content": "Translate.\n\nHallo"}, {"role": "assistant", "content": "Hello"}]
    assert result.records[1]["messages"][0] == {"role": "system", "content": "Be kind."}


def test_unknown_format_names_file_record_and_the_known_keys(tmp_path):
    path = write(tmp_path / "odd.json", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError) as err:
        read_conversations(path)
    message = str(err.value)
    assert str(path) in message and "record 0" in message and "'completion'" in message
    for hint in ("messages", "conversation", "instruction", "conversations"):
        assert hint in message


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
     "role 'assistant' where 'user' was expected"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "not a string"),
    ({"conversation": [{"input": "a", "output": "b"}, {"system": "s", "input": "c", "output": "d"}]},
     "only the first turn"),
])
def test_bad_records_name_file_record_and_problem(tmp_path, record, fragment):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "conversation" in record:
        good = {"conversation": [{"input": "q", "output": "a"}]}
    path = write(tmp_path / "d.jsonl", [good, record], jsonl=True)
    result = read_conversations(path)
    assert len(result.records) == 1 and len(result.problems) == 1
    message = str(result.problems[0])
    assert f"{path} record 1" in message and fragment in message


def test_pack_groups_never_exceed_max_length_and_keep_every_sample():
    lengths = [5, 9, 3, 12, 7, 1, 8, 4]
    groups = pack_groups(lengths, 16, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 16 for g in groups)
    assert len(groups) == 4  # 49 tokens: four rows of 16 is the fewest
    assert groups == pack_groups(lengths, 16, seed=0)  # seeded: the same rows every run
    assert sorted(groups) == sorted(pack_groups(lengths, 16, seed=1))  # the seed orders them


def test_pack_groups_leave_little_padding_on_a_llava_like_mix():
    """Longest first into the fullest row that fits: rows of 1024 from 2000 samples of 20 to
    1024 tokens are 99.9% full (filling them in data order left about a fifth empty)."""
    rng = random.Random(0)
    lengths = [min(1024, 20 + int(rng.expovariate(1 / 300))) for _ in range(2000)]
    groups = pack_groups(lengths, 1024, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(2000))
    assert all(sum(lengths[i] for i in g) <= 1024 for g in groups)
    assert sum(lengths) / (1024 * len(groups)) > 0.99
    assert pack_groups([2000, 10], 1024, seed=0) in ([[0], [1]], [[1], [0]])  # too long: alone


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory, tiny_lm):
    records = [{"messages": [{"role": "user", "content": "Who are you?" * (1 + i % 3)},
                             {"role": "assistant", "content": f"I am Nova number {i}."}]}
               for i in range(6)]
    path = write(tmp_path_factory.mktemp("sft") / "d.json", records)
    model, tokenizer = load_llm(tiny_lm)
    dataset = ConversationDataset(path, tokenizer, INTERNLM2_CHAT, max_length=256)
    return model, tokenizer, dataset


@pytest.mark.parametrize("row_length", [4096, 120])
def test_packed_loss_equals_unpacked_loss(text_dataset, row_length):
    model, tokenizer, dataset = text_dataset
    collate = Collator(tokenizer.pad_token_id)
    unpacked = collate([dataset[i] for i in range(len(dataset))])
    packed_set = PackedDataset(dataset, row_length, seed=0)
    packed = collate([packed_set[i] for i in range(len(packed_set))])
    assert packed.input_ids.shape[0] == (1 if row_length == 4096 else len(packed_set)) < 6
    assert packed.attention_mask is None and packed.num_tokens == unpacked.num_tokens
    assert packed.num_label_tokens == unpacked.num_label_tokens > 0
    # Each sample's own length, packed or not (for attention's FLOPs, training/flops.py).
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert unpacked.sample_lengths == lengths
    assert sorted(packed.sample_lengths) == sorted(lengths)
    llava = LlavaModel(model)  # the training forward: summed loss over the label tokens
    with torch.no_grad():
        out_unpacked = llava(**unpacked.model_inputs())
        out_packed = llava(**packed.model_inputs())
    assert out_packed.num_tokens.item() == out_unpacked.num_tokens.item() == packed.num_label_tokens
    assert torch.allclose(out_packed.loss_sum, out_unpacked.loss_sum, rtol=1e-5), (
        out_packed.loss_sum, out_unpacked.loss_sum)
    # and the sum is the plain cross-entropy of the whole logits
    logits = model(input_ids=unpacked.input_ids, attention_mask=unpacked.attention_mask).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), unpacked.labels[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(out_unpacked.loss_sum, reference, rtol=1e-5)


def test_packed_sample_sees_nothing_of_its_neighbours(text_dataset):
    """Logits of the second sample in a packed row equal its logits alone."""
    model, tokenizer, dataset = text_dataset
    first, second = dataset[0], dataset[1]
    row = torch.cat([first["input_ids"], second["input_ids"]])[None]
    positions = torch.cat([torch.arange(len(first["input_ids"])),
                           torch.arange(len(second["input_ids"]))])[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second["input_ids"][None], use_cache=False).logits
    assert torch.allclose(packed[0, len(first["input_ids"]):], alone[0], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_segmented_attention_equals_the_masked_one(text_dataset, packed):
    """Training's attention without a mask (models/attention.py) gives the loss and gradients
    transformers' SDPA gives with its padding or packed-sequence mask; GQA included."""
    model, tokenizer, dataset = text_dataset
    items = [dataset[i] for i in range(len(dataset))]
    if packed:
        packed_set = PackedDataset(dataset, 120, seed=0)
        items = [packed_set[i] for i in range(len(packed_set))]
    batch = Collator(tokenizer.pad_token_id)(items)
    if packed:  # samples of 46-58 tokens, two to a row, and the row's padding after them
        width = batch.input_ids.shape[1]
        lengths = dataset.lengths()
        rows = [[lengths[i] for i in group] for group in packed_set.groups]
        assert [len(row) for row in rows] == [2, 2, 2]
        assert batch.segments == tuple(tuple(row) + ((width - sum(row),) if sum(row) < width
                                                      else ()) for row in rows)
        assert any(len(row) == 3 for row in batch.segments)  # one row at least is padded
    else:
        assert batch.segments is None and (batch.attention_mask == 0).any()
    llava = LlavaModel(model)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = llava(**batch.model_inputs())
        out.loss_sum.backward()
        return out.loss_sum.detach(), [p.grad.clone() for p in model.parameters()]

    before = model.config._attn_implementation
    masked = loss_and_grads()
    use_segmented_attention(model)
    try:
        segmented = loss_and_grads()
    finally:
        model.set_attn_implementation(before)
        model.zero_grad()
    assert torch.allclose(segmented[0], masked[0], rtol=1e-5), (segmented[0], masked[0])
    for got, want in zip(segmented[1], masked[1], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 0),
                    reason="torch's varlen attention (flash attention) needs a CUDA GPU of "
                           "compute capability 8.0 or later")
def test_varlen_attention_on_the_gpu_equals_the_masked_one(text_dataset, monkeypatch):
    """On a GPU in bf16, packed rows go through torch's varlen kernel (one call per layer) and
    give the loss and gradients transformers' masked SDPA gives (scripts/gpu_check.sh runs it)."""
    import copy

    from llava_tune.models import attention

    model, tokenizer, dataset = text_dataset
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    packed_set = PackedDataset(dataset, 120, seed=0)
    batch = Collator(tokenizer.pad_token_id)([packed_set[i] for i in range(len(packed_set))])
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v
              for k, v in batch.model_inputs().items()}
    varlen, calls = attention._varlen, []

    def counted(*args):
        calls.append(args[0].shape)
        return varlen(*args)

    monkeypatch.setattr(attention, "_varlen", counted)
    llava = LlavaModel(model)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = llava(**inputs)
        out.loss_sum.backward()
        return out.loss_sum.detach().float(), [p.grad.float() for p in model.parameters()]

    masked = loss_and_grads()
    use_segmented_attention(model)
    segmented = loss_and_grads()
    assert len(calls) == model.config.num_hidden_layers, calls  # a call per layer
    assert torch.allclose(segmented[0], masked[0], rtol=2e-2), (segmented[0], masked[0])
    for got, want in zip(segmented[1], masked[1], strict=True):
        assert torch.allclose(got, want, rtol=5e-2, atol=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_lm, text_dataset, checkpointed):
    """train.compile: torch.compile'd decoder layers give the eager model's loss and gradients
    for batches of two widths (compiled for dynamic shapes): packed rows (their attention left
    eager), or, under gradient checkpointing, right-padded rows (the checkpointed layer
    compiled whole, recomputed in backward)."""
    _, tokenizer, dataset = text_dataset
    eager, _ = load_llm(tiny_lm)
    compiled, _ = load_llm(tiny_lm)
    for model in (eager, compiled):
        use_segmented_attention(model)
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
    compile_layers(compiled)
    collate = Collator(tokenizer.pad_token_id)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for width in (120, 200):
        if checkpointed:  # right-padded: samples of 46 and 52 tokens, then of 46-58
            items = [dataset[i] for i in (range(2) if width == 120 else range(2, 6))]
        else:
            packed_set = PackedDataset(dataset, width, seed=0)
            items = [packed_set[i] for i in range(len(packed_set))]
        batch = collate(items)
        assert (batch.segments is None) == checkpointed
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            out = LlavaModel(model)(**batch.model_inputs())
            out.loss_sum.backward()
            results.append((out.loss_sum.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss, grads), (compiled_loss, compiled_grads) = results
        assert torch.allclose(compiled_loss, loss, rtol=1e-5), (compiled_loss, loss)
        for got, want in zip(compiled_grads, grads, strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    if checkpointed:  # one region per layer: no graph break left it eager
        assert not counters["graph_break"], dict(counters["graph_break"])


def test_segmented_attention_refuses_segments_that_miss_the_row(text_dataset):
    model, tokenizer, dataset = text_dataset
    q = torch.zeros(1, 4, 10, 16)
    kv = torch.zeros(1, 2, 10, 16)
    attention = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="cover 9 positions of 10"):
        segmented_attention(attention, q, kv, kv, None, segments=((4, 5),))
    with pytest.raises(ValueError, match="takes no mask"):
        segmented_attention(attention, q, kv, kv, torch.ones(1, 1, 10, 10, dtype=torch.bool))


def test_mixed_image_and_text_records_train_in_one_batch(stage_overrides, shapes_data, tmp_path):
    from llava_tune.config import load_config
    from llava_tune.training import train

    images = json.loads((shapes_data / "finetune.json").read_text())[:6]
    texts = json.loads((shapes_data / "text.json").read_text())[:6]
    mixed = write(tmp_path / "mixed.json", images + texts)
    config = load_config(REPO / "configs/demo/finetune.yaml", stage_overrides("finetune") + [
        "init_from=null", f"data.train={mixed}", "train.max_steps=3", "train.batch_size=12",
        "data.max_length=64"])
    events = []
    result = train(config, on_event=events.append)
    assert result.data.kept == 12 and result.steps == 3
    losses = [e.loss for e in events if type(e).__name__ == "Logged"]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    # One batch of 12 holds both kinds; both the projector (image samples) and the LoRA
    # (every sample) trained.
    from safetensors.torch import load_file

    adapter = load_file(Path(config.run_dir) / "llm_adapter" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (Path(config.run_dir) / "projector" / "model.safetensors").is_file()


def test_self_cognition_data_names_name_and_author(tmp_path):
    out = tmp_path / "self.json"
    subprocess.run([sys.executable, str(REPO / "scripts/make_self_cognition.py"), "--name", "Nova",
                    "--author", "Ada Lab", "--out", str(out)], check=True)
    records = read_conversations(out).records
    questions = {r["messages"][0]["content"] for r in records}
    assert {"Who are you?", "What is your name?", "Introduce yourself."} <= questions
    assert len(records) >= 100
    for record in records:
        answer = record["messages"][-1]["content"]
        assert "Nova" in answer and "Ada Lab" in answer


def test_every_format_trains_the_same_text_only_run(stage_overrides, tmp_path):
    """The four formats of one conversation train the same run: equal losses, step by step."""
    from llava_tune.config import load_config
    from llava_tune.training import train

    records = {
        "openai": {"messages": [{"role": "user", "content": "Who are you?"},
                                {"role": "assistant", "content": "I am Nova."}]},
        "xtuner": {"conversation": [{"input": "Who are you?", "output": "I am Nova."}]},
        "alpaca": {"instruction": "Who are you?", "input": "", "output": "I am Nova."},
        "llava": {"conversations": [{"from": "human", "value": "Who are you?"},
                                    {"from": "gpt", "value": "I am Nova."}]},
    }
    curves = {}
    for fmt, record in records.items():
        data = write(tmp_path / f"{fmt}.jsonl", [record] * 4, jsonl=True)
        config = load_config(REPO / "configs/demo/sft.yaml", stage_overrides("lm", fmt) + [
            f"data.train={data}", "train.max_steps=2", "train.batch_size=2",
            "data.max_length=128", "train.log_every=1"])
        result = train(config)
        assert (result.data.kept, result.steps) == (4, 2)
        assert (Path(config.run_dir) / "llm_adapter" / "adapter_model.safetensors").is_file()
        curves[fmt] = [json.loads(line)["loss"] for line in
                       (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(curve == curves["openai"] for curve in curves.values()), curves
