"""The preference loss of models/preference.py against TRL's DPOTrainer: same loss, same
gradient on every policy parameter, same rewards, for DPO (sigmoid) and IPO, on a tiny random
Llama and a character-level tokenizer written here (no network). Also `sequence_logps` against
the full-logits formula.

What TRL 1.16 does, and these tests rely on: a plain-text pair is tokenized as prompt,
prompt + chosen + EOS and prompt + rejected + EOS (the tokenizer's BOS in front of each); the
completion is what follows the common prefix, so its EOS is scored and counted. sigmoid sums
log-probabilities over the completion; ipo divides each log-ratio by the completion's tokens.
"""

from __future__ import annotations

import copy
import string

import pytest

pytest.importorskip("trl", reason="the parity tests compare with TRL: pip install -e .[test]")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from llava_tune.constants import IGNORE_INDEX  # noqa: E402
from llava_tune.models.preference import (  # noqa: E402
    average_logps,
    preference_losses,
    sequence_logps,
    sft_term,
)

# TRL's own call of a deprecated transformers name, on every step: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]

# transformers 5 renamed gradient_checkpointing (TRL turns it on by default): off, by
# whichever name this version has, so both sides run the plain forward.
NO_CHECKPOINTING = ({"activation_checkpointing": False}
                    if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                    else {"gradient_checkpointing": False})

PAIRS = [  # different lengths, so per-token means and padding matter
    {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green grass"},
    {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " five"},
    {"prompt": "Q: cat says? A:", "chosen": " meow meow", "rejected": " woof"},
    {"prompt": "Hi", "chosen": " hello there", "rejected": " go"},
]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, BOS added in front like Llama's tokenizer; EOS
    written as text ("</s>", as TRL appends it) is read as the special token."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2, tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # init_std 0.02 gives near-uniform outputs; make the test sharper
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def models_and_tokenizer():
    tokenizer = char_tokenizer()
    policy = tiny_llama(len(tokenizer), seed=0)
    reference = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():  # a slightly different reference: the first loss is not log 2
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference, tokenizer


def trl_step(models_and_tokenizer, tmp_path, pairs, **config):
    """TRL's loss on one batch of all `pairs` (in order), the policy's gradients, the
    processed examples it used, and its logged metrics."""
    policy, reference, tokenizer = models_and_tokenizer
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(pairs),
                     max_length=None, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     save_strategy="no", seed=0, **NO_CHECKPOINTING, **config)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    batch = trainer.data_collator(examples)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, examples, batch, metrics


def our_rows(examples, pad_id: int):
    """[2P, T] ids and labels, chosen rows then rejected rows, built from TRL's token ids:
    prompt + answer, labels on the answer only, right padding."""
    rows = [(e["prompt_ids"], e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        labels[i, len(prompt):n] = torch.tensor(answer)
        mask[i, :n] = 1
    return ids, labels, mask


def our_step(models_and_tokenizer, examples, *, beta, loss_type, label_smoothing=0.0,
             sft_weight=0.0):
    policy, reference, tokenizer = models_and_tokenizer
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    policy.train()
    ids, labels, mask = our_rows(examples, tokenizer.pad_token_id)
    hidden = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logps, counts = sequence_logps(hidden, policy.lm_head, labels, chunk=7)
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_logps, _ = sequence_logps(ref_hidden, reference.lm_head, labels)
    sums, ref_sums = logps, ref_logps
    if loss_type == "ipo":
        logps, ref_logps = average_logps(logps, counts), average_logps(ref_logps, counts)
    (pc, pr), (rc, rr) = logps.chunk(2), ref_logps.chunk(2)
    out = preference_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing)
    losses = out.losses
    if sft_weight:
        losses = losses + sft_weight * sft_term(sums.chunk(2)[0], counts.chunk(2)[0])
    loss = losses.mean()  # TRL: the mean over the batch's pairs
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters()}
    return loss.detach(), grads, out, counts, (sums.detach(), ref_sums)


def assert_same_step(ours, theirs):
    loss, grads = ours
    trl_loss, trl_grads = theirs
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        assert trl_grads[name].abs().sum() > 0, name  # every parameter really is trained
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- against TRL


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_loss_and_gradients_match_trl(models_and_tokenizer, tmp_path, loss_type, beta):
    tokenizer = models_and_tokenizer[2]
    trl_loss, trl_grads, examples, batch, metrics = trl_step(
        models_and_tokenizer, tmp_path, PAIRS, loss_type=loss_type, beta=beta)

    # The token ids TRL used: BOS in front of the prompt, EOS appended to both answers (and
    # part of the completion, so scored and counted).
    for e, pair in zip(examples, PAIRS, strict=True):
        assert e["prompt_ids"] == tokenizer(pair["prompt"])["input_ids"]
        assert e["prompt_ids"][0] == tokenizer.bos_token_id
        for key in ("chosen", "rejected"):
            answer = e[f"{key}_ids"]
            assert answer[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in answer
            assert len(answer) == len(pair[key]) + 1
    ids, _, mask = our_rows(examples, tokenizer.pad_token_id)
    trl_ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tokenizer.pad_token_id)
    assert torch.equal(trl_ids, ids) and torch.equal(batch["attention_mask"], mask)

    loss, grads, out, counts, (sums, ref_sums) = our_step(models_and_tokenizer, examples,
                                                          beta=beta, loss_type=loss_type)
    assert abs(trl_loss.item() - (0.6931 if loss_type == "sigmoid" else 1.0)) > 1e-3
    assert_same_step((loss, grads), (trl_loss, trl_grads))
    assert counts.tolist() == [len(e["chosen_ids"]) for e in examples] + [
        len(e["rejected_ids"]) for e in examples]

    # TRL logs beta x the summed log-ratios for every loss type. With ipo the caller passed
    # per-token means, so its rewards are per-token; the sums give TRL's.
    if loss_type == "ipo":
        (pc, pr), (rc, rr) = sums.chunk(2), ref_sums.chunk(2)
        out = preference_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    for key, rewards in (("chosen", out.chosen_rewards), ("rejected", out.rejected_rewards)):
        assert metrics[f"rewards/{key}"] == pytest.approx(rewards.mean().item(), rel=1e-5,
                                                          abs=1e-7)


def test_label_smoothing_matches_trl_conservative_dpo(models_and_tokenizer, tmp_path):
    """cDPO: TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss is the cDPO formula
    on log-ratios sorted across the batch, which for one pair is no sort at all."""
    pair = PAIRS[2:3]
    trl_loss, trl_grads, examples, _, _ = trl_step(
        models_and_tokenizer, tmp_path, pair, loss_type="aot", beta=0.1, label_smoothing=0.1)
    loss, grads, *_ = our_step(models_and_tokenizer, examples, beta=0.1, loss_type="sigmoid",
                               label_smoothing=0.1)
    assert_same_step((loss, grads), (trl_loss, trl_grads))
    plain, *_ = our_step(models_and_tokenizer, examples, beta=0.1, loss_type="sigmoid")
    assert abs(plain.item() - loss.item()) > 1e-3  # the smoothing did change the loss


def test_sft_term_matches_trl_when_chosen_lengths_are_equal(models_and_tokenizer, tmp_path):
    """TRL's "sft" loss is the mean NLL over all chosen tokens of the batch; ours is each
    pair's mean, averaged over pairs: the same when every chosen answer is as long."""
    pairs = [{"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green grass"},
             {"prompt": "Q: 2+2? A:", "chosen": " four", "rejected": " 5"}]
    trl_loss, trl_grads, examples, _, _ = trl_step(
        models_and_tokenizer, tmp_path, pairs, loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5], beta=0.1)
    loss, grads, *_ = our_step(models_and_tokenizer, examples, beta=0.1, loss_type="sigmoid",
                               sft_weight=0.5)
    assert_same_step((loss, grads), (trl_loss, trl_grads))


# --------------------------------------------------------------------------- the primitives


def full_logits_logps(hidden, head, labels):
    """The reference formula: all logits, log_softmax, gather, masked row sums."""
    logp = torch.log_softmax(head(hidden)[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_sequence_logps_equals_full_logits(chunk):
    torch.manual_seed(0)
    rows, length, dim, vocab = 4, 9, 8, 13
    head = torch.nn.Linear(dim, vocab)
    hidden = torch.randn(rows, length, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, length))
    labels[:, :3] = IGNORE_INDEX  # prompts
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # a row without labels
    labels[3, 4] = IGNORE_INDEX  # a hole

    logps, counts = sequence_logps(hidden, head, labels, chunk=chunk)
    weights = torch.randn(rows)
    (logps * weights).sum().backward()
    ours = hidden.grad.clone(), [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()

    expected, expected_counts = full_logits_logps(hidden, head, labels)
    (expected * weights).sum().backward()
    assert logps.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.tolist() == expected_counts.tolist() == [6, 3, 0, 5]
    assert logps[2].item() == 0.0
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(ours[0], hidden.grad)
    for got, want in zip(ours[1], head.parameters(), strict=True):
        torch.testing.assert_close(got, want.grad)


def test_sequence_logps_without_any_label_is_a_connected_zero():
    head = torch.nn.Linear(4, 5)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    logps, counts = sequence_logps(hidden, head, torch.full((2, 3), IGNORE_INDEX))
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    logps.sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_losses_by_formula_and_unknown_type():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    z = (pc - rc) - (pr - rr)
    out = preference_losses(pc, pr, rc, rr, beta=0.2, loss_type="sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(out.losses, -0.9 * F.logsigmoid(0.2 * z) - 0.1 * F.logsigmoid(-0.2 * z))
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.2 * (pr - rr))
    ipo = preference_losses(pc, pr, rc, rr, beta=0.2, loss_type="ipo")
    torch.testing.assert_close(ipo.losses, (z - 2.5) ** 2)
    torch.testing.assert_close(sft_term(torch.tensor([-6.0, 0.0]), torch.tensor([3, 0])),
                               torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        preference_losses(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
