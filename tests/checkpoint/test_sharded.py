"""The sharded reader (megams.checkpoint.sharded): a target rank reads only its own pieces.

On synthetic checkpoints written the way DeepSpeed writes them (tests/checkpoint/synthetic.py): every
layout reads back exactly; a tp8 x pp8 (64-rank) checkpoint resharded to tp4 x pp2 (8 ranks), each
target rank alone, opening only the files of the stages and tensor ranks that hold its slices and
copying exactly its share; a rank's peak RSS while loading (a subprocess, 223 MiB checkpoint) stays
under its shard + one tensor (+ 16 MiB), where reading the whole checkpoint does not; a parameter the
checkpoint lacks is refused with one line naming it. On the real 2/4-rank gloo checkpoints of the
reshard chain: the same per-rank accounting."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megams.checkpoint import CheckpointError
from megams.checkpoint.reshard import local_piece, read_piece
from megams.checkpoint.sharded import open_checkpoint, open_source
from tests.checkpoint.synthetic import full_tensors, layout_record, plain_model, write_checkpoint
from tests.training.common import ROOT

MODEL = plain_model(layers=6, d=16, h=32, vocab=100)
KINDS = ("param", "exp_avg", "exp_avg_sq")


def _expected_piece(full, shape, dim, tp_rank, tp):
    return local_piece(full, shape, dim, tp_rank, tp)


def _unpadded_bytes(plain_shape, local_shape, dim, tp_rank):
    """Bytes of this rank's piece that lie inside the plain shape (the rest is padding, never read)."""
    if dim is None:
        return math.prod(plain_shape) * 4
    lo = local_shape[dim] * tp_rank
    rows = max(0, min(lo + local_shape[dim], plain_shape[dim]) - lo)
    return rows * math.prod(n for i, n in enumerate(plain_shape) if i != dim) * 4


@pytest.mark.parametrize("tp,pp,dp,zero", [(1, 1, 1, 0), (2, 1, 1, 0), (1, 1, 3, 1), (2, 2, 2, 1), (8, 8, 1, 1)])
def test_every_layout_reads_back(tmp_path, tp, pp, dp, zero):
    write_checkpoint(str(tmp_path), MODEL, tp, pp, dp, zero)
    src = open_checkpoint(str(tmp_path))
    assert src.optimizer and src.adam_step() == 7
    for kind in KINDS:
        for name, full in full_tensors(MODEL, kind).items():
            assert torch.equal(src.read(name, kind), full), (name, kind)
            for dim in range(full.dim()):  # any box along any dim, zero padded past the plain size
                n = full.shape[dim]
                got = src.read(name, kind, dim=dim, start=n // 3, length=n)
                want = torch.cat([full.narrow(dim, n // 3, n - n // 3),
                                  full.new_zeros([n // 3 if i == dim else s for i, s in enumerate(full.shape)])], dim)
                assert torch.equal(got, want), (name, kind, dim)


def test_tp8_pp8_resharded_to_tp4_pp2_rank_by_rank(tmp_path):
    """64 source ranks -> 8 target ranks. Each target rank reads only its share, from only the files
    of the source stages holding its layers and the source tensor ranks covering its slices."""
    write_checkpoint(str(tmp_path), MODEL, tp=8, pp=8, dp=1, zero=1)
    source = json.load(open(tmp_path / "megams.json"))["parameters"]
    holder = {}  # plain name -> source stage
    for r in source["mp_ranks"]:
        for _, plain, _, _, _ in r["params"]:
            holder.setdefault(source["tied"].get(plain, plain), r["pp"])
    target = layout_record(MODEL, tp=4, pp=2)
    fulls = {k: full_tensors(MODEL, k) for k in KINDS}
    largest = max(t.numel() for t in fulls["param"].values()) * 4
    total = sum(t.numel() for t in fulls["param"].values()) * 4 * len(KINDS)
    seen = 0
    for rec in target["mp_ranks"]:
        src = open_checkpoint(str(tmp_path))  # a fresh reader: what this rank alone does
        share, allowed = 0, set()
        for _, plain, shape, dim, _ in rec["params"]:
            plain = target["tied"].get(plain, plain)
            if dim is None:
                tps = {0}
            else:  # the tp8 shards that overlap this tp4 shard (a padded vocabulary does not split evenly)
                full, src_local = MODEL[plain][0][dim], math.ceil(MODEL[plain][0][dim] / 8)
                lo, hi = shape[dim] * rec["tp"], min(shape[dim] * (rec["tp"] + 1), full)
                tps = {t for t in range(8) if t * src_local < hi and (t + 1) * src_local > lo}
                assert len(tps) <= 3
            s = holder[plain]
            for t in tps:
                allowed |= {f"mp_rank_{s * 8 + t:02d}_model_states.pt",
                            f"zero_pp_rank_0_mp_rank_{s * 8 + t:02d}_optim_states.pt"}
            for kind in KINDS:
                box = (shape[dim] * rec["tp"], shape[dim]) if dim is not None else (0, None)
                pieces = src.plan(plain, kind, dim, *box)
                assert {p.file for p in pieces} <= allowed
                got = read_piece(src, plain, kind, shape, dim, rec["tp"])
                assert torch.equal(got, _expected_piece(fulls[kind][plain], shape, dim, rec["tp"], 4)), (plain, kind)
                share += _unpadded_bytes(MODEL[plain][0], shape, dim, rec["tp"])
        opened = {os.path.basename(f) for f in src.stats.files}
        assert opened <= allowed, sorted(opened - allowed)
        assert src.stats.read == share  # exactly this rank's share was copied out of the files
        assert src.stats.peak_transient <= largest  # one tensor at most in scratch
        assert len(opened) <= 3 * 2 * 5  # <= 3 tp ranks x (model + optim file) x at most 5 of the 8 source stages
        seen += share
    assert seen >= total  # the 8 target ranks together read everything (replicated ones on every tp rank)


RSS_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from megams.checkpoint.reshard import read_piece
from megams.checkpoint.sharded import open_checkpoint
from tests.checkpoint.synthetic import layout_record, plain_model
ckpt, mode, spec = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = plain_model(**spec)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
src = open_checkpoint(ckpt) if mode == "rank" else None
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
base = hwm()
kept = []
if mode == "rank":  # target rank (tp 0, stage 0) of tp4 x pp2: its pieces, kept as an engine keeps them
    target = layout_record(model, tp=4, pp=2)
    rec = target["mp_ranks"][0]
    for _, plain, shape, dim, _ in rec["params"]:
        plain = target["tied"].get(plain, plain)
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            kept.append(read_piece(src, plain, kind, shape, dim, rec["tp"]))
else:  # the whole checkpoint, as the reader did before it was sharded
    from megams.checkpoint import read_checkpoint
    state = read_checkpoint(ckpt, optimizer=True, checksums=False)
    kept = list(state.params.values())
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
print(json.dumps({"growth": hwm() - base, "kept": sum(t.numel() * t.element_size() for t in kept),
                  "read": src.stats.read if src else None, "scratch": src.stats.peak_transient if src else None,
                  "anon": status("RssAnon"), "file": status("RssFile")}))
"""


def _rss(ckpt, mode, spec):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, ROOT, ckpt, mode, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_of_one_rank_is_its_shard_plus_one_tensor(tmp_path):
    spec = dict(layers=8, d=256, h=2048, vocab=8000)
    model = plain_model(**spec)
    write_checkpoint(str(tmp_path), model, tp=2, pp=2, dp=1, zero=1)
    files = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    largest = max(math.prod(s) for s, _, _ in model.values()) * 4
    rank = _rss(str(tmp_path), "rank", spec)
    whole = _rss(str(tmp_path), "whole", spec)
    # the kept share + at most one tensor (scratch, or mapped file pages not yet dropped) + 16 MiB for the
    # pickles, page granularity and the allocator; the file pages a copy came from are dropped after it
    bound = rank["kept"] + largest + (16 << 20)
    print(f"checkpoint {files / 2**20:.0f} MiB; one tp4*pp2 rank: share {rank['kept'] / 2**20:.1f} MiB, read "
          f"{rank['read'] / 2**20:.1f} MiB from the mapped files, scratch {rank['scratch'] / 2**20:.1f} MiB, peak RSS "
          f"growth {rank['growth'] / 2**20:.1f} MiB (bound {bound / 2**20:.1f}); whole-checkpoint read: "
          f"{whole['growth'] / 2**20:.1f} MiB")
    assert rank["scratch"] <= largest and rank["read"] <= 2 * rank["kept"]
    assert rank["growth"] <= bound
    assert whole["growth"] > bound  # the measurement can tell: reading everything does not fit the bound


def test_a_parameter_the_checkpoint_lacks_is_named(tmp_path):
    write_checkpoint(str(tmp_path), MODEL, tp=2, pp=1)
    src = open_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        src.read("blocks.0.gate.weight")
    assert str(e.value) == (f"{tmp_path}: has no parameter blocks.0.gate.weight (the model expects it; was it "
                            "written by an older megams?)")


def test_load_from_an_older_checkpoint_lacking_a_parameter(tmp_path):
    """Through start_from: refused before anything is written, one line naming the parameter. The
    checkpoint's model config lacks the newer field entirely (written before it existed)."""
    from megams.checkpoint.reshard import start_from
    from megams.config import dump_config, load_config
    cfg = load_config(os.path.join(ROOT, "configs", "tiny", "vanilla.yaml"), [])
    write_checkpoint(str(tmp_path), MODEL, tp=1, pp=1)
    meta = json.load(open(tmp_path / "megams.json"))
    model = dump_config(cfg)["model"]
    meta["config"]["model"] = {k: v for k, v in model.items() if k != "dropout"} | {"type": model["type"]}
    json.dump(meta, open(tmp_path / "megams.json", "w"))
    record = layout_record(MODEL, 1, 1)
    record["mp_ranks"][0]["params"].append(["blocks.0.gate.weight", "blocks.0.gate.weight", [16], None, None])
    layout = SimpleNamespace(dims=None, dp=1, tp=1, pp=1, dp_rank=0)
    with pytest.raises(CheckpointError) as e:
        start_from(SimpleNamespace(), None, cfg, layout, record, str(tmp_path), log=lambda s: None)
    assert str(e.value) == (f"checkpoint.load_from: {tmp_path}: has no parameter blocks.0.gate.weight (the model "
                            "expects it; was it written by an older megams?)")


def test_pretrained_directory_is_read_per_slice(tmp_path):
    from megams.checkpoint.export import write_safetensors
    fulls = full_tensors(MODEL)
    (tmp_path / "config.json").write_text("{}")
    write_safetensors(str(tmp_path / "model.safetensors"), {n: list(t.shape) for n, t in fulls.items()},
                      fulls.__getitem__, torch.float32)
    from safetensors.torch import load_file
    assert all(torch.equal(load_file(str(tmp_path / "model.safetensors"))[n], t) for n, t in fulls.items())
    src = open_source(str(tmp_path))
    for n, t in fulls.items():
        assert torch.equal(src.read(n), t), n
    src.stats.read = 0
    wo = fulls["blocks.0.wo.weight"]
    assert torch.equal(src.read("blocks.0.wo.weight", dim=1, start=8, length=8), wo[:, 8:16])
    assert src.stats.read == wo[:, 8:16].numel() * 4  # only that slice came off the file
    emb = fulls["embed.weight"]
    got = src.read("embed.weight", dim=0, start=96, length=8)  # past the vocabulary: zeros
    assert torch.equal(got[:4], emb[96:]) and not got[4:].any()


def test_pretrained_pt_directory(tmp_path):
    fulls = full_tensors(MODEL)
    (tmp_path / "config.json").write_text("{}")
    torch.save(fulls, tmp_path / "model.pt")
    src = open_source(str(tmp_path))
    for n, t in fulls.items():
        assert torch.equal(src.read(n), t), n
    wq = fulls["blocks.1.wq.weight"]
    assert torch.equal(src.read("blocks.1.wq.weight", dim=0, start=16, length=16), wq[16:])


CONVERT_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("convert", sys.argv[1] + "/tools/convert_checkpoint.py")
convert = importlib.util.module_from_spec(spec); spec.loader.exec_module(convert)
import megams.checkpoint.export, megams.checkpoint.sharded, safetensors.torch  # imports before the baseline
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
rc = convert.main([sys.argv[2], sys.argv[3]])
print(json.dumps({"rc": rc, "growth": hwm() - base}))
"""


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """tools/convert_checkpoint.py on a 223 MiB tp2*pp2 ZeRO-1 checkpoint (40 MiB of fp32 weights): the
    written model.safetensors holds the full tensors, and the converter's peak RSS stays under two of
    the largest tensors + 16 MiB (it never holds the model)."""
    spec = dict(layers=8, d=256, h=2048, vocab=8000)
    model = plain_model(**spec)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    write_checkpoint(str(ckpt), model, tp=2, pp=2, dp=1, zero=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", CONVERT_CHILD, ROOT, str(ckpt), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    assert "streamed tensor by tensor" in proc.stdout
    from safetensors.torch import load_file
    got = load_file(str(out / "model.safetensors"))
    fulls = full_tensors(model)
    assert set(got) == set(fulls)
    for n, t in fulls.items():
        assert torch.equal(got[n], t), n
    weights = sum(t.numel() for t in fulls.values()) * 4
    largest = max(t.numel() for t in fulls.values()) * 4
    print(f"convert: {weights / 2**20:.1f} MiB of weights, peak RSS growth {res['growth'] / 2**20:.1f} MiB")
    # one tensor assembled + one being written, + 16 MiB (pickles, allocator): well under the model
    assert res["growth"] <= 2 * largest + (16 << 20) < weights
