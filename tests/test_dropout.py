"""common/training/dropout.py: the fast CPU dropout keeps the statistics of dropout, is seeded, and the attention
path equals softmax(QK^T) with the same mask; a training run uses it and saves a clean config."""
from __future__ import annotations

import json

import pytest
import torch

from common.training import dropout as FD


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_per_lane_and_unbiased_scale(p):
    torch.manual_seed(0)
    keep, scale = FD.keep_mask((400, 1000), p, "cpu")
    # each int64 draw feeds four 16-bit lanes: none of them may be biased (e.g. a sign bit never set)
    lanes = keep.reshape(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.005), lanes
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    x = torch.ones(200_000)
    y = FD.dropout(x, p)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(scale, rel=1e-6)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation kept
    assert torch.equal(FD.dropout(x, p, training=False), x) and torch.equal(FD.dropout(x, 0.0), x)


def test_same_seed_same_mask_and_gradient_through_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    a = FD.dropout(x, 0.3)
    torch.manual_seed(5)
    b = FD.dropout(x, 0.3)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad, (a.detach() != 0).float() / (1 - round(0.3 * 65536) / 65536))
    assert a.dtype == x.dtype and FD.dropout(x.bfloat16(), 0.3).dtype == torch.bfloat16


def test_attention_with_dropout_equals_softmax_with_the_same_mask_and_sdpa_without():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    attend = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    attend[1, :, :, 5:] = False  # padding of the second example
    module.train()
    torch.manual_seed(11)
    out, _ = FD.attention_forward(module, q, k, v, attend, dropout=0.2, scaling=0.25)
    torch.manual_seed(11)
    keep, scale = FD.keep_mask((2, 3, 7, 7), 0.2, "cpu")
    probs = torch.softmax((q @ k.transpose(2, 3) * 0.25).masked_fill(~attend, float("-inf")), -1)
    expected = ((probs * keep * scale) @ v).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)
    module.eval()  # no dropout: transformers' own SDPA
    ref, _ = sdpa_attention_forward(module, q, k, v, attend, dropout=0.0, scaling=0.25)
    assert torch.equal(FD.attention_forward(module, q, k, v, attend, dropout=0.0, scaling=0.25)[0], ref)


def test_install_swaps_dropout_and_attention_and_uninstall_restores(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    info = FD.install(model)
    assert info["dropout_modules"] > 0 and info["attention"] is True
    assert all(type(m) is not torch.nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == FD.NAME
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-6)  # eval: same model
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" not in n)
    FD.uninstall(model, info)
    assert model.config._attn_implementation == "sdpa"


def test_training_run_uses_fast_dropout_on_cpu_and_saves_a_clean_config(tiny_model, sentiment_files, tmp_path):
    import train_cls
    from conftest import FAST

    base = ["--model", tiny_model, "--train_file", sentiment_files["train"], "--validation_file",
            sentiment_files["dev"], *FAST, "--max_steps", "4"]
    res = train_cls.main(base + ["--output_dir", str(tmp_path / "fast")])
    on_cpu = res["setup"]["device"] == "cpu"  # on a GPU the fast dropout is not installed (torch's is fast there)
    assert res["setup"]["fast_dropout"] is on_cpu and res["setup"]["attn_implementation"] == "sdpa"
    assert FD.NAME not in (tmp_path / "fast" / "config.json").read_text()
    off = train_cls.main(base + ["--output_dir", str(tmp_path / "off"), "--no_fast_dropout"])
    assert off["setup"]["fast_dropout"] is False
    assert json.loads((tmp_path / "off" / "config.json").read_text())["architectures"] == \
        json.loads((tmp_path / "fast" / "config.json").read_text())["architectures"]
