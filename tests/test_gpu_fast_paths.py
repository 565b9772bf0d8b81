"""The GPU fast paths on CUDA: packed XE, the compiled decoder step, bf16 and the fused Adam step.

Skipped without CUDA (CI has none); a session with a GPU runs them before taking any benchmark figure:
``pytest -q tests/test_gpu_fast_paths.py``. The CPU equivalents are in tests/test_packed.py.
"""
from __future__ import annotations

import pytest
import torch

from butd.config.defaults import ModelConfig
from butd.models import build_model
from butd.train.distributed import DistContext
from butd.train.step import train_step
from butd.train.xe import XeObjective
from test_packed import FEAT, VOCAB, batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny_model(device: str = "cuda", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(feature_dim=FEAT, rnn_size=32, att_hid_size=16, input_encoding_size=24, dropout=0.0,
                      **overrides)
    return build_model(cfg, VOCAB).to(device).train()


def xe_loss_and_grads(model, packed: bool, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = XeObjective(model, packed=packed)(batch().to("cuda")).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["updown", "showtell", "showattendtell"])
def test_packed_equals_plain_on_cuda(name):
    model = tiny_model(name=name)
    plain_loss, plain_grads = xe_loss_and_grads(model, packed=False)
    packed_loss, packed_grads = xe_loss_and_grads(model, packed=True)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name_, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name_], grad, rtol=1e-4, atol=1e-5, msg=name_)


def test_packed_bf16_stays_close_to_fp32():
    model = tiny_model()
    fp32_loss, _ = xe_loss_and_grads(model, packed=True)
    bf16_loss, grads = xe_loss_and_grads(model, packed=True, bf16=True)
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.02 * fp32_loss.item()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_inductor_compiled_step_equals_eager_on_cuda():
    model = tiny_model()
    eager_loss, eager_grads = xe_loss_and_grads(model, packed=True)
    model.compile_advance()  # inductor, the train.compile path
    compiled_loss, compiled_grads = xe_loss_and_grads(model, packed=True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_fused_adam_step_matches_the_cpu_step():
    """The loop's CUDA optimiser (fused Adam) takes the same step as the CPU one (foreach Adam)."""
    ctx_gpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    ctx_cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    gpu, cpu = tiny_model("cuda"), tiny_model("cpu")
    for model, ctx, fused in ((gpu, ctx_gpu, True), (cpu, ctx_cpu, False)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        for _ in range(3):
            _, good = train_step(XeObjective(model), model, optimizer, batch().to(ctx.device), ss_prob=0.0,
                                 grad_clip=0.1, bf16=False, ctx=ctx)
            assert good
    for (name, p_gpu), p_cpu in zip(gpu.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-4, atol=1e-5, msg=name)
