"""The same pure-PyTorch code on CUDA (no bitsandbytes needed): skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from slimtune.quant import Linear4bit, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1536, 576), (1001,), (7, 13)], ids=str)
def test_cuda_matches_cpu(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    packed, state = quantize_nf4(x)
    packed_gpu, state_gpu = quantize_nf4(x.cuda())
    assert torch.equal(packed_gpu.cpu(), packed)  # 4-bit codes: identical
    # the mean offset is a reduction whose order differs on GPU, so an 8-bit block scale may move one step
    ref = dequantize_nf4(packed, state).float()
    torch.testing.assert_close(dequantize_nf4(packed_gpu, state_gpu).cpu().float(), ref, rtol=0.03, atol=1e-6)


def test_cuda_layer_matches_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(130, 70)
    q = Linear4bit.from_linear(lin)
    qc = Linear4bit.from_linear(lin.cuda())
    assert torch.equal(qc.weight.cpu(), q.weight)
    x = torch.randn(4, 130, requires_grad=True)
    xc = x.detach().cuda().requires_grad_()
    torch.testing.assert_close(qc(xc).cpu(), q(x), rtol=1e-3, atol=1e-3)
    qc(xc).sum().backward(), q(x).sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-3, atol=1e-3)
