"""attention.sdpa on the CPU (torch's scaled_dot_product_attention, each backend a config) against softmax(Q K^T *
scale + bias) V in float64: a [H, S, S] bias (LeViT's attention biases) reaches the fused backends as a 4-D mask,
and the flash backend is offered only where Q/K and V heads have one size (LeViT's V heads are wider)."""
from __future__ import annotations

import torch

from kiln.backends.tactic import TacticContext, get_tactic
from tests.backends.test_cpu_attention_dnnl import _attention64, _node

CPU = TacticContext(torch.device("cpu"))


def _run_all_configs(q, k, v, mask, scale: float) -> list[str]:
    t = get_tactic("attention.sdpa")
    node = _node(tuple(q.shape), tuple(k.shape), tuple(v.shape), mask, scale=scale)
    assert t.supports(node, CPU)
    want = _attention64(q, k, v, mask, scale, False)
    names = []
    for cfg in t.configs(node, CPU):
        got = t.make(node, cfg, torch.device("cpu"))(q, k, v, mask)
        err = float((got.double() - want).abs().max())
        assert err < 1e-5, (cfg, err)
        names.append(cfg["backend"])
    return names


def test_head_bias_mask_and_equal_heads_take_flash() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 13, 16, generator=g) for _ in range(3))
    bias = torch.randn(4, 13, 13, generator=g)  # [H, Sq, Skv]: broadcast over the batch
    assert "flash" in _run_all_configs(q, k, v, bias, 0.25)


def test_wider_value_heads_are_not_offered_flash() -> None:
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 4, 11, 8, generator=g) for _ in range(2))
    v = torch.randn(1, 4, 11, 16, generator=g)
    bias = torch.randn(4, 11, 11, generator=g)
    assert _run_all_configs(q, k, v, bias, 0.35) == ["auto", "math"]


def test_heads_strided_in_their_last_dim_run_every_backend(recwarn) -> None:
    """Q, K, V views whose last dim is not of stride 1 (a qkv packed head-major, as TinyViT and DaViT export it):
    the fused backends get dense copies, so every config runs without torch declining (and warning)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 8, 19, generator=g).transpose(-1, -2) for _ in range(3))  # [B, H, S, D], D strided
    assert q.stride(-1) != 1
    assert "flash" in _run_all_configs(q, k, v, None, 0.3)
    assert not [w for w in recwarn.list if "stride" in str(w.message) or "kernel not used" in str(w.message)]
