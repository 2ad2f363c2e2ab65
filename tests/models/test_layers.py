"""Building blocks: rotary is relative, attention shards by heads, norms and MLP variants."""
import pytest
import torch

from megams.models.layers import (MLP, Attention, Block, apply_rotary, make_norm, rotary_cos_sin,
                                  rotary_tables)
from tests.models.cases import tiny


def test_rotary_scores_depend_on_distance_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        return (apply_rotary(q, torch.tensor([i]), 10000.0) * apply_rotary(k, torch.tensor([j]), 10000.0)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_rotary_tables_are_cached_and_exact():
    """Default positions (0..T-1) reuse one cached cos/sin table per (length, head_dim, base, device),
    bit for bit what rotary_cos_sin computes; explicit positions give the same rotation."""
    cos, sin = rotary_tables(16, 8, 10000.0, "cpu")
    ref = rotary_cos_sin(torch.arange(16), 8, 10000.0)  # [16, 4]; the tables are full width, [16, 8]
    assert torch.equal(cos, torch.cat([ref[0], ref[0]], -1)) and torch.equal(sin, torch.cat([-ref[1], ref[1]], -1))
    again = rotary_tables(16, 8, 10000.0, torch.device("cpu"))
    assert again[0] is cos and again[1] is sin
    assert rotary_tables(16, 8, 500.0, "cpu")[0] is not cos
    x = torch.randn(2, 16, 3, 8)
    assert torch.equal(apply_rotary(x, None, 10000.0), apply_rotary(x, torch.arange(16), 10000.0))
    with torch.inference_mode():  # never cached from inference mode (it could not be saved for backward)
        assert rotary_tables(17, 8, 10000.0, "cpu")[0] is not rotary_tables(17, 8, 10000.0, "cpu")[0]


def test_attention_with_fewer_heads_is_a_tensor_parallel_shard():
    """Column-split wq/wk/wv and row-split wo by heads: the shards' outputs sum to the full output."""
    torch.manual_seed(0)
    full = Attention(32, 4, rotary_base=10000.0)
    x = torch.randn(2, 9, 32)
    parts = []
    for r in range(2):
        rows = slice(16 * r, 16 * (r + 1))
        shard = Attention(32, 4, rotary_base=10000.0)  # head_dim 8; holds 2 of the 4 heads
        for name in ("wq", "wk", "wv"):
            getattr(shard, name).weight = torch.nn.Parameter(getattr(full, name).weight[rows])
        shard.wo.weight = torch.nn.Parameter(full.wo.weight[:, rows])
        parts.append(shard(x))
    torch.testing.assert_close(parts[0] + parts[1], full(x), atol=1e-6, rtol=1e-5)


def test_fused_qkv_is_the_three_projections():
    """fused_qkv: one matmul of [wq; wk; wv] (the projections' own forwards are not called), equal in
    output and in every weight's gradient to three separate projections; cross-attention (k, v from
    another sequence) and projections that are not a bare F.linear (a bias, a ZeRO-3 partition)
    take the separate path."""
    torch.manual_seed(0)
    fused, plain = Attention(32, 4, rotary_base=10000.0), Attention(32, 4, rotary_base=10000.0, fused_qkv=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 32)

    def refuse(*_):
        raise AssertionError("the fused path called a projection's own forward")

    calls = [fused.wq.register_forward_pre_hook(refuse), fused.wk.register_forward_pre_hook(refuse)]
    y = fused(x)
    torch.testing.assert_close(y, plain(x), rtol=1e-6, atol=1e-6)
    (y ** 2).sum().backward()
    (plain(x) ** 2).sum().backward()
    for name in ("wq", "wk", "wv", "wo"):
        torch.testing.assert_close(getattr(fused, name).weight.grad, getattr(plain, name).weight.grad,
                                   rtol=1e-5, atol=1e-6)
    # and it saves no more per sequence for backward (storages counted once, the batch-2 minus batch-1
    # difference as in megams.bench.runner, so the concatenated weight cancels): a v that is a view
    # would keep q and k's columns of the fused output alive once rotary has made new q and k
    def saved_per_seq(att):
        def saved(batch):
            storages = {}

            def pack(t):
                if not isinstance(t, torch.nn.Parameter):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = att(torch.randn(batch, 16, 32, requires_grad=True))
            del y
            return sum(storages.values())
        return saved(2) - saved(1)
    for rotary in (10000.0, None):
        sizes = [saved_per_seq(Attention(32, 4, rotary_base=rotary, fused_qkv=f)) for f in (False, True)]
        assert sizes[0] == sizes[1] > 0, (rotary, sizes)
    with pytest.raises(AssertionError, match="own forward"):  # cross-attention: separate projections
        fused(x, torch.randn(2, 5, 32), causal=False)
    for h in calls:
        h.remove()
    fused.wq.weight.ds_id = 7  # a ZeRO-3 partitioned weight: DeepSpeed gathers it in wq's forward only
    seen = []
    fused.wq.register_forward_pre_hook(lambda *_: seen.append(1))
    fused(x)
    assert seen == [1]


def test_attention_is_causal_and_cross_attention_masks():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(1, 6, 16)
    y = attn(x)
    x2 = x.clone()
    x2[:, 4] += 1
    assert torch.equal(attn(x2)[:, :4], y[:, :4])
    ctx = torch.randn(1, 3, 16)
    mask = torch.tensor([[True, False, False]] * 6)
    out = attn(x, ctx, causal=False, mask=mask)
    ctx2 = ctx.clone()
    ctx2[:, 1:] = 0
    assert torch.equal(out, attn(x, ctx2, causal=False, mask=mask))


@pytest.mark.parametrize("norm,cls", [("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm)])
def test_norm_factory(norm, cls):
    assert isinstance(make_norm(tiny("vanilla", norm=norm)), cls)


@pytest.mark.parametrize("mlp,names", [("gelu", {"fc_in", "fc_out"}), ("swiglu", {"w_gate", "w_up", "w_down"})])
def test_mlp_names_and_block(mlp, names):
    cfg = tiny("vanilla", mlp=mlp)
    assert set(dict(MLP(cfg).named_children())) == names
    blk = Block(cfg)
    assert set(dict(blk.named_children())) >= {"norm1", "attn", "norm2", "mlp"}
    assert blk(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    if mlp == "swiglu":
        assert cfg.ffn_size % 64 == 0
