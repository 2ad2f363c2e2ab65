"""Smoke test: every benchmark study's code path at toy scale (no timing asserts)."""
import json
import math
import os

import pytest

from megams.bench import peers, scaling, throughput, tiny, tradeoff
from megams.bench.runner import run_spec

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60)
TOY = {"d_model": 32, "n_heads": 2}


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


def quiet(*_):
    pass


def _benchmark_cli():
    """tools/benchmark.py as a module (its `main(argv)` returns the exit status)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "tools"))
    import benchmark
    return benchmark


def test_tradeoff_toy(tmp_path, corpus):
    models = {"vanilla-2": {"type": "vanilla", "n_layers": 2, **TOY},
              "vanilla-1": {"type": "vanilla", "n_layers": 1, **TOY},
              "bottom-up": {"type": "bottom_up", "shorten_factors": [2, 2], "layers_per_scale": [1, 1, 1],
                            "n_post": 1, "pooling": "linear", "aggregation": "sum", "upsampling": "linear", **TOY}}
    out = tmp_path / "tradeoff"
    res = tradeoff.run(corpus, str(out), d=32, heads=2, L=2, seq_len=32, batch=2, steps=3, eval_batches=1,
                       eval_every=2, threads=1, models=models, data_cache=str(tmp_path / "cache"), runner=run_spec,
                       log=quiet)
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["vanilla-1"]["act_ratio"] == pytest.approx(1.0)
    assert all(r["act_bytes_per_seq"] > 0 and r["val_ppl"] > 1 for r in rows.values())
    assert (out / "tradeoff.png").exists() and json.load(open(out / "tradeoff.json"))["study"] == "tradeoff"
    # seeds: one run per seed, rows hold the mean and std; resume keeps the runs already made
    calls = []

    def counting(spec):
        calls.append(spec["seed"])
        return run_spec(spec)
    few = {k: models[k] for k in ("vanilla-1", "bottom-up")}
    kw = dict(d=32, heads=2, L=2, seq_len=32, batch=2, steps=2, eval_batches=1, eval_every=2, threads=1,
              models=few, data_cache=str(tmp_path / "cache"), log=quiet)
    res = tradeoff.run(corpus, str(tmp_path / "seeds"), seeds=[1, 2], runner=counting, **kw)
    assert calls == [1, 2, 1, 2]
    for r in res["rows"]:
        bpb = [x["val_bpb"] for x in r["runs"]]
        assert r["seeds"] == [1, 2] and bpb[0] != bpb[1]  # the seed reaches init and data order
        assert r["val_bpb"] == pytest.approx(sum(bpb) / 2) and r["val_bpb_std"] == pytest.approx(abs(bpb[0] - bpb[1]) / 2 ** 0.5)
    res = tradeoff.run(corpus, str(tmp_path / "seeds"), seeds=[1, 2, 3], runner=counting, resume=True, **kw)
    assert calls[4:] == [3, 3] and all(r["seeds"] == [1, 2, 3] for r in res["rows"])
    res = tradeoff.run(corpus, str(tmp_path / "seeds"), seeds=[1], runner=counting, resume=True,
                       **{**kw, "models": {**few, "vanilla-2": models["vanilla-2"]}, "only": ["vanilla-2"]})
    assert calls[6:] == [1] and {r["label"]: r["seeds"] for r in res["rows"]} == {
        "vanilla-2": [1], "vanilla-1": [1, 2, 3], "bottom-up": [1, 2, 3]}
    # a model's own learning rate reaches its run (and only its run)
    seen = {}

    def recording(spec):
        seen[spec["label"]] = spec["lr"]
        return run_spec(spec)
    tradeoff.run(corpus, str(tmp_path / "lr"), runner=recording, **{**kw, "models": {
        "vanilla-1": models["vanilla-1"], "bottom-up": {**models["bottom-up"], "lr": 3e-3}}})
    assert seen == {"vanilla-1": 1e-3, "bottom-up": 3e-3}
    # the default model set is well-formed for the documented L
    from megams.config.schema import ModelConfig
    defaults = tradeoff.default_models(128, 4, 8)
    for m in defaults.values():
        ModelConfig(**tradeoff.split_run_options(m)[0])
    assert {m["type"] for m in defaults.values()} == {"vanilla", "bottom_up", "top_down", "retina"}
    assert all("lr" in m for m in defaults.values())
    # with sub-word tokens top-down takes its BPE-tuned rate (RESULTS §1b); the others keep theirs
    sub = tradeoff.default_models(128, 4, 8, tokenizer="bpe:2048")
    td = next(k for k in defaults if k.startswith("top-down"))
    assert (defaults[td]["lr"], sub[td]["lr"]) == (8e-3, 4e-3)
    assert all(sub[k]["lr"] == defaults[k]["lr"] for k in defaults if k != td)


def test_tradeoff_models_file_errors_name_model_and_field(tmp_path, capsys):
    benchmark = _benchmark_cli()
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"vanilla-4": {"type": "vanilla", "n_layer": 4}}))
    with pytest.raises(ValueError, match=r"(?s)m.json: model 'vanilla-4'.*n_layer"):
        tradeoff.load_models(str(bad))
    # the CLI: one line naming the file, the model and the field, exit 2, before any model trains
    assert benchmark.main(["tradeoff", "--models", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --models {bad}: model 'vanilla-4'") and "n_layer" in err
    assert not (tmp_path / "o").exists()
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        tradeoff.load_models(str(bad))
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"v": {"type": "vanilla", "n_layers": 1, "lr": 2e-3}}))
    assert tradeoff.load_models(str(good))["v"]["lr"] == 2e-3


def test_tradeoff_bpe_tokens(tmp_path, capsys):
    """--tokenizer bpe:N: a BPE trained on the corpus' head only (never the validation tail), cached,
    its vocabulary reaching every model, bits per byte over the validation text's bytes."""
    text = TEXT * 3
    p = tmp_path / "c.txt"
    # a tail of ~10% that only validation reads: its one pair is the corpus' most frequent, so a BPE that
    # read it would merge it first (checked: with BPE_TRAIN_FRACTION = 1.0 this test fails)
    p.write_text(text + ("zq" * 20 + "\n") * (len(text) // 369))
    specs = []

    def recording(spec):
        specs.append(spec)
        return run_spec(spec)
    kw = dict(d=32, heads=2, L=2, seq_len=16, batch=2, steps=2, eval_batches=1, eval_every=0, threads=1,
              models={"vanilla-1": {"type": "vanilla", "n_layers": 1, **TOY}},
              data_cache=str(tmp_path / "cache"), log=quiet, runner=recording)
    res = tradeoff.run(str(p), str(tmp_path / "o"), tokenizer="bpe:300", **kw)
    from megams.data.tokenizers import load_tokenizer
    tok = load_tokenizer(specs[0]["tokenizer"])
    assert specs[0]["model"]["vocab_size"] == tok.vocab_size == 300
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any("Citizen" in x or "speak" in x for x in pieces)  # merges learned from the head
    assert not any("zq" in x for x in pieces)                    # nothing from the validation tail
    row = res["rows"][0]
    assert res["setting"]["tokenizer"] == "bpe:300" and 0 < row["val_bpb"] < 20
    mtime = os.path.getmtime(specs[0]["tokenizer"])
    tradeoff.run(str(p), str(tmp_path / "o2"), tokenizer="bpe:300", **kw)
    assert specs[1]["tokenizer"] == specs[0]["tokenizer"] and os.path.getmtime(specs[0]["tokenizer"]) == mtime
    plain = tmp_path / "plain.txt"  # ordinary text: ~1.37 bytes per token with 44 merges, bits/byte < bits/token
    plain.write_text(text)
    row = tradeoff.run(str(plain), str(tmp_path / "o3"), tokenizer="bpe:300", **kw)["rows"][0]
    assert specs[2]["tokenizer"] != specs[0]["tokenizer"]
    assert 0 < row["val_bpb"] < row["val_loss"] / math.log(2) / 1.2
    benchmark = _benchmark_cli()
    assert benchmark.main(["tradeoff", "--tokenizer", "bpe:lots", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("error: --tokenizer bpe:lots: expected byte, bpe:N")


def test_profile_toy(tmp_path):
    """The profile study: each model with the option off then on, the top ops of profiled steps."""
    from megams.bench import profile
    res = profile.run(str(tmp_path), size="d128", seq_len=32, batch=2, steps=3, profile_steps=1, top=5, threads=1,
                      runner=run_spec, log=quiet)
    assert [(r["model"], r["on"]) for r in res["rows"]] == [
        ("vanilla", False), ("vanilla", True), ("bottom_up", False), ("bottom_up", True)]
    for r in res["rows"]:
        ops = r["profile"]["top"]
        assert len(ops) == 5 and ops[0]["self_ms"] >= ops[-1]["self_ms"] > 0
        assert any(o["op"] == "aten::mm" for o in ops)
    mm = {r["on"]: next(o["calls"] for o in r["profile"]["top"] if o["op"] == "aten::mm")
          for r in res["rows"] if r["model"] == "vanilla"}
    assert mm[True] < mm[False]  # fused QKV: one projection matmul per attention instead of three
    assert (tmp_path / "profile.md").exists()


def test_tradeoff_fresh_process(tmp_path, corpus):
    from megams.bench.runner import run_fresh
    r = run_fresh({"model": {"type": "vanilla", "n_layers": 1, **TOY}, "data_path": corpus, "seq_len": 16,
                   "batch": 2, "steps": 2, "eval_batches": 1, "threads": 1, "data_cache": str(tmp_path / "c")})
    assert r["peak_rss_bytes"] > 0 and r["val_bpb"] > 0


def test_throughput_toy(tmp_path):
    sizes = {"toy": (32, 2, 2)}
    grid = [{"model": m, "size": "toy", "precision": p, "compile": False, "ac": ac}
            for m, p, ac in (("vanilla", "fp32", False), ("bottom_up", "bf16", True), ("retina", "fp32", False),
                             ("top_down", "fp32", False))]
    res = throughput.run(str(tmp_path), grid=grid, seq_len=32, batch=2, steps=1, threads=1, peak_n=128,
                         peak_seconds=0.05, sizes=sizes, log=quiet)
    assert len(res["rows"]) == 4 and all(r["mfu"] > 0 for r in res["rows"])
    assert len(throughput.default_grid()) > 20


@pytest.mark.skipif(not all(peers.available().values()),
                    reason="peers not installed (transformers, hourglass-transformer-pytorch, litgpt: "
                           "tools/requirements-bench.txt)")
def test_peers_toy(tmp_path, corpus):
    assert set(peers.available()) == {"gpt2", "hourglass", "litgpt"}
    res = peers.run(corpus, str(tmp_path), d=32, heads=2, L=4, k=2, seq_len=32, batch=2, steps=2, threads=1,
                    repeats=1, data_cache=str(tmp_path / "cache"), runner=run_spec, log=quiet, plot_png=False)
    assert [r["peer"] for r in res["rows"]] == ["gpt2", "hourglass", "litgpt"]
    assert all(r["tok_ratio"]["median"] > 0 and r["act_ratio"] > 0 for r in res["rows"])
    settings = {r["peer"]: r["peer_setting"] for r in res["rows"]}
    assert "sdpa" in settings["gpt2"] and "scaled_dot_product_attention" in settings["litgpt"]
    lit = res["rows"][2]
    # litgpt's shape is megams' rotary vanilla with an untied head: the same parameter count
    assert lit["megams_params"] == lit["peer_params"]


def test_peers_spread_and_ratio_arithmetic():
    s = peers.spread([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    r = peers.paired_ratios([100.0, 90.0, 120.0], [50.0, 60.0, 40.0])
    assert r["values"] == [2.0, 1.5, 3.0]
    assert (r["median"], r["min"], r["max"], r["n"]) == (2.0, 1.5, 3.0, 3)
    with pytest.raises(ValueError):
        peers.paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        peers.spread([])


def test_peers_repeats_alternate_without_peers(tmp_path):
    """A fake runner (no peer installed needed): every model once per repeat, in A B C D order, the
    JSON keeps every repeat, and the row's numbers are medians / paired ratios of those repeats."""
    calls = []
    tok = {"megams": [100.0, 80.0, 120.0], "gpt2": [50.0, 50.0, 40.0], "hourglass": [100.0, 40.0, 60.0]}

    def fake(spec):
        n = sum(1 for c in calls if c["label"] == spec["label"])
        calls.append(spec)
        return {"tokens_per_s": tok[spec["impl"]][n], "params": 10, "act_bytes_per_seq": 4 if spec["impl"] == "megams" else 8,
                "peak_rss_bytes": 1024 ** 2 * (n + 1), "loss_curve": [1.0]}

    res = peers.run("corpus.txt", str(tmp_path), d=32, heads=2, L=4, k=2, seq_len=32, batch=2, steps=2,
                    repeats=3, runner=fake, log=quiet, have={"gpt2": True, "hourglass": True, "litgpt": False},
                    plot_png=False)
    impls = [c["impl"] for c in calls]
    assert impls == ["megams", "gpt2", "megams", "hourglass"] * 3
    assert res["setting"]["repeats"] == 3 and len(res["setting"]["run_order"]) == 12
    gpt2, hg = res["rows"]
    assert [r["repeat"] for r in gpt2["megams_runs"]] == [0, 1, 2] and len(gpt2["peer_runs"]) == 3
    assert "loss_curve" not in gpt2["megams_runs"][0]
    assert gpt2["megams_tokens_per_s"] == {"median": 100.0, "min": 80.0, "max": 120.0, "n": 3}
    assert gpt2["tok_ratio"]["values"] == [2.0, 1.6, 3.0] and gpt2["tok_ratio"]["median"] == 2.0
    assert (hg["tok_ratio"]["min"], hg["tok_ratio"]["median"], hg["tok_ratio"]["max"]) == (1.0, 2.0, 2.0)
    assert gpt2["act_ratio"] == 0.5
    text = (tmp_path / "peers.md").read_text()
    assert "2.00x (1.60–3.00)" in text and "hourglass" in text and "litgpt" not in text
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert len(saved["rows"][0]["peer_runs"]) == 3


def test_peers_ceiling_from_the_profiled_kernels(tmp_path):
    """profile_steps: one more profiled run per model, outside the timed repeats; the ceiling is the
    peer's step over its own matmul + attention kernels (other ops do not count as kernels)."""
    def prof(ops):
        return {"self_s": sum(ms for _, ms in ops) / 1e3, "top": [{"op": o, "self_ms": ms, "calls": 1, "share": 0}
                                                                 for o, ms in ops]}
    ops = {"megams": [("aten::mm", 60.0), ("aten::_scaled_dot_product_flash_attention_for_cpu", 20.0),
                      ("aten::gelu", 20.0)],
           "gpt2": [("aten::addmm", 70.0), ("aten::mm", 30.0), ("aten::copy_", 20.0)]}
    calls = []

    def fake(spec):
        calls.append(spec)
        r = {"tokens_per_s": 100.0, "params": 10, "act_bytes_per_seq": 4, "peak_rss_bytes": 1}
        if spec.get("profile_steps"):
            r["profile"] = prof(ops[spec["impl"]])
        return r
    res = peers.run("corpus.txt", str(tmp_path), d=32, heads=2, L=4, k=2, seq_len=32, batch=2, steps=30,
                    repeats=2, runner=fake, log=quiet, have={"gpt2": True}, plot_png=False, profile_steps=3)
    assert [bool(c.get("profile_steps")) for c in calls] == [False] * 4 + [True] * 2
    assert calls[-1]["profile_top"] >= 100 and calls[-1]["measure_activations"] is False
    row = res["rows"][0]
    assert row["megams_kernel_share"] == pytest.approx(0.8) and row["peer_kernel_share"] == pytest.approx(100 / 120)
    assert row["ceiling"] == pytest.approx(120 / 100)
    assert "80% / 83%" in (tmp_path / "peers.md").read_text() and "1.20x" in (tmp_path / "peers.md").read_text()
    # a peer profile where no kernel is recognised gives no ceiling (not a division by zero)
    ops["gpt2"] = [("aten::copy_", 20.0)]
    res = peers.run("corpus.txt", str(tmp_path / "none"), d=32, heads=2, L=4, k=2, seq_len=32, batch=2, steps=30,
                    repeats=1, runner=fake, log=quiet, have={"gpt2": True}, plot_png=False, profile_steps=3)
    assert res["rows"][0]["ceiling"] is None and res["rows"][0]["peer_kernel_share"] == 0
    # a CUDA profile ranks device kernels by their names, not aten ops
    cuda = {"by": "self_device_time_total", "self_s": 0.01, "top": [
        {"op": "sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n", "self_ms": 5.0},
        {"op": "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "self_ms": 2.0},
        {"op": "aten::mm", "self_ms": 0.0}, {"op": "vectorized_elementwise_kernel<gelu>", "self_ms": 3.0}]}
    assert peers.kernel_ms(cuda) == pytest.approx(7.0)


def test_scaling_partition_only(tmp_path):
    assert scaling.run(str(tmp_path), layouts=[], log=quiet) == 0
    bal = json.load(open(tmp_path / "scaling.json"))["partition_balance"]
    assert all(r["cost"] <= r["uniform"] + 1e-9 for r in bal)


def test_tiny_through_trainer(tmp_path, corpus):
    cfg = os.path.join(tiny.ROOT, "configs", "tiny", "vanilla.yaml")
    res = tiny.run(corpus, str(tmp_path), steps=2, configs=[cfg], threads=1, log=quiet,
                   extra=["--set", "data.seq_len=32", "--set", "training.micro_batch_size=2",
                          "--set", "training.global_batch_size=2", "--set", "model.d_model=32",
                          "--set", "training.eval_batches=1", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert res["rows"][0]["params"] > 0 and res["rows"][0]["val_ppl"] > 1
