"""The memory-lean LM loss (models/loss.py) is the plain loss: same value, same gradients."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava_tune.constants import IGNORE_INDEX
from llava_tune.models.loss import lm_loss_sum


def plain(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def case(seed=0, batch=2, length=40, dim=16, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen, requires_grad=True)
    head = nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=gen) * 0.1)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :5] = IGNORE_INDEX  # a prompt
    labels[1, 30:] = IGNORE_INDEX  # padding
    return hidden, head, labels


@pytest.mark.parametrize("chunk", [7, 64, 4096])  # many chunks (recomputed), one, one large
def test_loss_and_gradients_equal_the_plain_path(chunk):
    hidden, head, labels = case()
    expected = plain(hidden, head, labels)
    expected.backward()
    want_hidden, want_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    loss, count = lm_loss_sum(hidden, head, labels, chunk=chunk)
    loss.backward()
    assert count.item() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(hidden.grad, want_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, want_head, rtol=1e-5, atol=1e-7)


def test_a_lora_head_gets_its_gradients_too():
    hidden, head, labels = case(seed=1)
    model = nn.Sequential()
    model.lm_head = head
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    lora_head = wrapped.base_model.model.lm_head
    with torch.no_grad():
        lora_head.lora_B.default.weight.normal_()
    expected = plain(hidden, lora_head, labels)
    (grad_b,) = torch.autograd.grad(expected, [lora_head.lora_B.default.weight])
    loss, _ = lm_loss_sum(hidden, lora_head, labels, chunk=5)
    (got_b,) = torch.autograd.grad(loss, [lora_head.lora_B.default.weight])
    torch.testing.assert_close(got_b, grad_b, rtol=1e-5, atol=1e-6)


def test_no_label_is_a_zero_that_still_backpropagates():
    hidden, head, labels = case()
    labels[:] = IGNORE_INDEX
    loss, count = lm_loss_sum(hidden, head, labels)
    assert loss.item() == 0 and count.item() == 0
    loss.backward()  # every process runs the same backward, even on a batch without labels
    assert hidden.grad is not None and (hidden.grad == 0).all()
