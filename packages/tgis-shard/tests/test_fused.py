"""FUSED_KERNELS: each elementwise chain compiled into one kernel gives what its eager ops give, in
bfloat16 too (intermediates rounded where eager rounds them), for one token and for many: bit for
bit on the CPU, within one bfloat16 step on a GPU (its reductions sum in another order, and
Triton's rsqrt is not CUDA's); off, and on CPUs, the eager ops run. The GPU's engine-level checks (tokens equal
transformers with graphs and fusion on) live in test_cuda_graphs.py."""

from __future__ import annotations

import pytest
import torch

from tgis_shard.layers import fused

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 256, 4, 2, 64
BFLOAT16_STEP = 2**-7  # the spacing of bfloat16 values, relative to their size


def _chains(tokens: int, device: str) -> dict[str, tuple]:
    """Each fused function with inputs of ``tokens`` rows, as a layer calls it."""
    g = torch.Generator().manual_seed(tokens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    qkv = rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)  # q and k as strided views, as split makes them
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    angles = torch.rand(tokens, HEAD_DIM, generator=g).to(device) * 6
    return {
        "rms_norm": (fused.rms_norm, (rand(tokens, HIDDEN), rand(HIDDEN), 1e-5)),
        "add_rms_norm": (fused.add_rms_norm, (rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(HIDDEN), 1e-6)),
        "rotate": (fused.rotate, (q, k, angles.cos().bfloat16(), angles.sin().bfloat16())),
        "silu_and_mul": (fused.gated("silu"), (rand(tokens, 2 * HIDDEN),)),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_each_compiled_chain_equals_its_eager_ops(device):
    for tokens in (1, 7, 33):
        for name, (chain, args) in _chains(tokens, device).items():
            expected = chain.fn(*args)
            got = chain.compiled(*args)
            for want, have in zip(*(out if isinstance(out, tuple) else (out,) for out in (expected, got)), strict=True):
                assert (have.dtype, have.shape) == (want.dtype, want.shape), name
                if device == "cpu":
                    assert torch.equal(have, want), f"{name} at {tokens} tokens"
                else:
                    torch.testing.assert_close(have, want, rtol=BFLOAT16_STEP, atol=0, msg=f"{name} at {tokens} tokens")


def test_on_a_cpu_and_when_turned_off_the_eager_ops_run(monkeypatch):
    calls = []
    chain = fused.rms_norm
    monkeypatch.setattr(type(chain), "compiled", property(lambda self: calls.append(1) or self.fn))
    x, weight = torch.randn(3, HIDDEN), torch.ones(HIDDEN)
    assert torch.equal(fused.rms_norm(x, weight, 1e-6), chain.fn(x, weight, 1e-6))
    assert calls == []
    if torch.cuda.is_available():
        fused.rms_norm(x.cuda(), weight.cuda(), 1e-6)
        assert calls == [1]
        fused.enable(False)
        try:
            fused.rms_norm(x.cuda(), weight.cuda(), 1e-6)
        finally:
            fused.enable(True)
        assert calls == [1]
