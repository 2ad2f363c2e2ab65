"""GPU-only checks of the CUDA path (run by tools/gpu_check.sh: `pytest -m gpu`); skipped without CUDA.

Each one is the CUDA counterpart of a CPU test: collectives on NCCL (tests/distributed/test_comm_device.py),
the prefetcher's pinned / side-stream copies (tests/training/test_prefetch.py), flex_attention forward and
backward against SDPA (tests/models/test_flex_attention.py), fused kernels (tests/training/test_kernels.py)
and the RNG tracker's CUDA stream (tests/parallel/test_rng_order.py).
"""
import tempfile

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def nccl_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_comm_on_nccl(nccl_group):
    from megams.distributed import comm
    assert not comm.backend_takes_cpu()
    assert comm.comm_device() == torch.device("cuda", 0)
    flag = comm.comm_tensor([1.0, 2.0])
    comm.all_reduce(flag)
    assert flag.tolist() == [1.0, 2.0]
    with pytest.raises(comm.CollectiveDeviceError, match="tensor on cpu, but backend 'nccl'"):
        comm.all_reduce(torch.ones(1))
    out = torch.empty(4, device="cuda")
    comm.all_gather_into_tensor(out, torch.arange(4.0, device="cuda"))
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_preemption_and_nonfinite_flags_on_nccl(nccl_group):
    """world_size 1 takes the local shortcut; the helper itself is what they call on more ranks."""
    from megams.training.nonfinite import NonFiniteGuard
    flags = NonFiniteGuard._gather_flags(True, False)
    assert flags.tolist() == [[1], [0]]


def test_prefetcher_cuda_side_stream():
    from megams.training.prefetch import Prefetcher
    steps = [[(torch.full((64, 256), float(i)), torch.full((64, 256), -float(i)))] for i in range(6)]
    with Prefetcher(iter(steps), "cuda", depth=2) as it:
        assert it.pin and it._stream is not None
        for i, batch in enumerate(it):
            x, y = batch[0]
            assert x.is_cuda and y.is_cuda
            big = torch.randn(2048, 2048, device="cuda")
            (big @ big).sum()  # work queued on the consumer's stream
            assert x.sum().item() == i * 64 * 256 and y.sum().item() == -i * 64 * 256


def test_flex_attention_forward_backward_equal_sdpa():
    from megams.models.layers import set_masked_attention
    from megams.models.retina_attention import RetinaAttention
    torch.manual_seed(0)
    attn = RetinaAttention(128, 4, factors=(4,), windows=(16, 8), chunk=16, rotary_base=10000.0).cuda()
    x = torch.randn(2, 250, 128, device="cuda", requires_grad=True)
    results = []
    try:
        for kind in ("sdpa", "flex"):
            set_masked_attention(kind)
            attn.zero_grad()
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = attn(x)
            y.float().square().mean().backward()
            results.append((y.float().detach(), x.grad.clone(), attn.wq.weight.grad.clone()))
    finally:
        set_masked_attention("auto")
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def test_kernels_on_cuda():
    from megams.config import load_config
    from megams.training import kernels
    cfg = load_config("configs/tiny/vanilla.yaml")
    choice = kernels.select(cfg, "cuda:0")
    p = torch.nn.Parameter(torch.randn(256, 256, device="cuda"))
    opt = choice.optimizer([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ref_p = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, ref_p.grad = g.clone(), g.clone()
        opt.step(), ref.step()
    torch.testing.assert_close(p, ref_p, rtol=1.6e-2, atol=1e-3)
    if choice.uses_apex:  # NVIDIA apex present: its fused norms against torch's, bf16 tolerance
        x = torch.randn(8, 128, 512, device="cuda", dtype=torch.bfloat16)
        fused = choice.apex.FusedLayerNorm(512).cuda().to(torch.bfloat16)
        torch.testing.assert_close(fused(x), torch.nn.functional.layer_norm(x, (512,)), rtol=1.6e-2, atol=1e-2)


def test_rng_tracker_switches_cuda_generator():
    from megams.parallel.random import RNGStatesTracker
    tracker = RNGStatesTracker()
    tracker.add("mp", 4321)
    before = torch.cuda.get_rng_state()
    with tracker.fork("mp"):
        inside = torch.rand(8, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    g = torch.Generator(device="cuda").manual_seed(4321)
    assert torch.equal(inside, torch.rand(8, device="cuda", generator=g))


def test_tiny_model_bf16_step_on_cuda():
    from megams.config import load_config
    from megams.models import build_model
    cfg = load_config("configs/tiny/bottom_up.yaml").model
    model = build_model(cfg, seed=0).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
