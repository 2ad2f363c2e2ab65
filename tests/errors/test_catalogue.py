"""The bad-input catalogue (docs/ERRORS.md): one test per entry, each through the real entry point
in this process (launch/pretrain.py's `main(argv)`, a tool's `main(argv)`), each asserting the exit
code, exactly one `error:` line of the documented shape naming the field or file, no traceback, and
that nothing saved before the call changed. `test_the_catalogue_and_the_tests_agree` keeps the
document and this file in step: test_<area>__<name> tests entry `<area>.<name>`.
"""
import os
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

from tests.errors.catalogue import (DOC, PLACEHOLDER, function_for, read_catalogue, run_tool, run_trainer,
                                    snapshot)
from tests.errors.conftest import trained_args
from tests.training.common import tiny_args

CKPT = os.path.join("checkpoints", "step_00000002")

def _fresh(tmp_path, *extra, model="vanilla"):
    """argv of a tiny run in a new run directory (text is tokenized in this process: no worker pool)."""
    return tiny_args(model, str(tmp_path / "run"), steps=2, extra=[f"data.cache_dir={tmp_path / 'cache'}",
                                                                   "data.num_workers=1", *extra])


def _unchanged_after(path, call):
    before = snapshot(path)
    outcome = call()
    assert snapshot(path) == before, f"{path} changed"
    return outcome


# --- config ---------------------------------------------------------------------------------------
def _config_error(capsys, trained_run, *extra, model="vanilla"):
    """A bad config against an existing run directory: refused before anything is touched."""
    argv = tiny_args(model, trained_run, steps=2, extra=extra)
    return _unchanged_after(trained_run, lambda: run_trainer(capsys, argv))


def test_config__missing_file(entry, capsys, tmp_path, trained_run):
    nope = tmp_path / "nope.yaml"
    out = _unchanged_after(trained_run, lambda: run_trainer(
        capsys, ["--config", nope, "--set", f"training.run_dir={trained_run}"]))
    entry.check(out, str(nope), "not found")


def test_config__bad_arguments(entry, capsys):
    out = run_trainer(capsys, ["--set", "training.max_steps=3"])
    entry.check(out, "the following arguments are required: --config")
    out = run_trainer(capsys, ["--config", "x.yaml", "--stps", "3"])
    entry.check(out, "unrecognized arguments: --stps 3")


def test_config__invalid_yaml(entry, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    entry.check(run_trainer(capsys, ["--config", bad]), str(bad), "not valid YAML")


def test_config__not_a_mapping(entry, capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    entry.check(run_trainer(capsys, ["--config", bad]), str(bad), "expected a mapping of sections", "got list")


def test_config__unknown_key(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "model.colour=blue"),
                "model.colour: unknown key", "accepted keys here: type, vocab_size,")


def test_config__unknown_key_in_file(entry, capsys, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trainig:\n  max_steps: 10\n")
    entry.check(run_trainer(capsys, ["--config", path]), str(path), "trainig: unknown key",
                "accepted keys here: model, data, parallel")


def test_config__wrong_type(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "training.max_steps=ten"),
                "training.max_steps: Input should be a valid integer", "(got 'ten')")


def test_config__not_an_option(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "model.type=gpt5"),
                "model.type: Input should be 'vanilla', 'bottom_up', 'top_down' or 'retina' (got 'gpt5')")


def test_config__out_of_range(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "parallel.zero_stage=4"),
                "parallel.zero_stage: Input should be less than or equal to 3 (got 4)")


def test_config__inconsistent_model(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "model.n_heads=3"),
                "model: d_model=32 must be divisible by n_heads=3")


def test_config__seq_len_not_divisible(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "data.seq_len=60", model="bottom_up"),
                "data.seq_len=60 is not divisible by the product of model.shorten_factors [4, 4] = 16")


def test_config__batch_not_divisible(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "training.global_batch_size=5"),
                "training.global_batch_size=5 is not a multiple of training.micro_batch_size=2")


def test_config__batch_not_divisible_by_dp(entry, capsys, trained_run, monkeypatch):
    from megams.training import trainer
    start = trainer.Trainer._init_distributed

    def two_data_ranks(self):  # one process standing in for rank 0 of two data-parallel ranks
        layout = start(self)
        layout.world, layout.dp = 2, 2
        return layout

    monkeypatch.setattr(trainer.Trainer, "_init_distributed", two_data_ranks)
    entry.check(_config_error(capsys, trained_run, "training.global_batch_size=6"),
                "training.global_batch_size=6 is not divisible by training.micro_batch_size=2 x data-parallel size 2 = 4")


def test_config__world_not_divisible(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "parallel.tensor=2"),
                "world size 1 is not divisible by parallel.tensor=2 x parallel.pipeline=1")


def test_config__pipeline_with_zero(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "parallel.pipeline=2", "parallel.zero_stage=2"),
                "parallel: zero_stage=2 with pipeline=2", "use zero_stage 0 or 1")


def test_config__compile_with_zero3(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "training.compile=true", "parallel.zero_stage=3"),
                "training.compile=true with parallel.zero_stage=3", "use zero_stage <= 2")


def test_config__vocab_below_bytes(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "model.vocab_size=100"),
                "model.vocab_size=100 is smaller than the byte tokenizer's 256")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where there is a GPU")
def test_config__fp16_on_cpu(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "training.precision=fp16"),
                "training.precision=fp16 needs a CUDA GPU", "use training.precision=bf16 or fp32")


def test_config__bad_override(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "bogus"), "override 'bogus' must look like key.sub=value")


def test_config__override_into_value(entry, capsys, trained_run):
    entry.check(_config_error(capsys, trained_run, "training.max_steps.x=1"),
                "--set training.max_steps.x", "'max_steps' is a value, not a section")


def test_config__missing_data_file(entry, capsys, tmp_path):
    missing = str(tmp_path / "missing.txt")
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={missing}")),
                f"data.path: {missing}: no such file", f"{missing}.bin and {missing}.idx")


# --- data -----------------------------------------------------------------------------------------
def test_data__empty_file(entry, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={empty}")), f"{empty}: empty file",
                "expected UTF-8 text")


def test_data__binary_file(entry, capsys, tmp_path):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 20)
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={blob}")),
                f"{blob}: binary file (NUL byte on line 1)", "expected UTF-8 text")


def test_data__no_documents(entry, capsys, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={blank}")), f"{blank}: no documents",
                "expected UTF-8 text")


def test_data__bad_jsonl(entry, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    out = run_tool(capsys, "preprocess_data", ["--input", bad, "--output-prefix", tmp_path / "out", "--no-progress"])
    entry.check(out, f"{bad}: line 2: no 'text' key", "expected a JSON object with the text under 'text'")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing half-written


def test_data__not_an_index(entry, capsys, tmp_path, byte_dataset, copy_dataset):
    prefix = copy_dataset(byte_dataset)
    with open(prefix + ".idx", "wb") as f:
        f.write(bytes(range(256)) * 4)
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}")), f"{prefix}.idx: not a megams index file",
                "expected one written by tools/preprocess_data.py")


def test_data__truncated_idx(entry, capsys, tmp_path, byte_dataset, copy_dataset):
    prefix = copy_dataset(byte_dataset)
    size = os.path.getsize(prefix + ".idx")
    os.truncate(prefix + ".idx", size - 3)
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}")),
                f"{prefix}.idx: truncated or corrupted index ({size - 3} bytes, the header says {size})")


def test_data__truncated_bin(entry, capsys, tmp_path, byte_dataset, copy_dataset):
    prefix = copy_dataset(byte_dataset)
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", 100)
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}")),
                f"{prefix}.bin: truncated or corrupted (100 bytes, the index says {size} tokens of 1 byte(s) = {size})")


def test_data__missing_bin(entry, capsys, tmp_path, byte_dataset, copy_dataset):
    prefix = copy_dataset(byte_dataset)
    os.remove(prefix + ".bin")
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}")),
                f"data.path: {prefix}.bin: no such file (found {prefix}.idx")


def test_data__dtype_mismatch(entry, capsys, tmp_path, byte_dataset, copy_dataset):
    prefix = copy_dataset(byte_dataset)
    with open(prefix + ".idx", "r+b") as f:  # header "<8sIIQQ": the dtype code is at byte 12 (1 = uint8)
        f.seek(12)
        f.write(struct.pack("<I", 2))
    size = os.path.getsize(prefix + ".bin")
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}")),
                f"{prefix}.idx: dtype mismatch: the index says uint16 tokens",
                f"holds {size} bytes = {size} tokens of uint8")


def test_data__token_id_out_of_range(entry, capsys, tmp_path, sp_dataset, sp_model, copy_dataset):
    prefix = copy_dataset(sp_dataset)
    tokens = np.fromfile(prefix + ".bin", dtype="<u2")
    tokens[40::50] = 9999  # every window of 65 tokens holds one
    tokens.tofile(prefix + ".bin")
    out = run_trainer(capsys, _fresh(tmp_path, f"data.path={prefix}", f"data.tokenizer={sp_model}",
                                  "model.vocab_size=400"))
    entry.check(out, f"{prefix}.bin: token id 9999 at token", "outside the vocabulary [0, 400)")


def test_data__too_small(entry, capsys, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x" * 40)  # 41 tokens with the end-of-document token
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.path={small}")),
                f"{small}: dataset too small: 41 tokens, the train split (90%) has 37",
                "fewer than one window of data.seq_len+1 = 65 tokens")


# --- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer__missing(entry, capsys, tmp_path):
    nope = tmp_path / "nope.model"
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.tokenizer={nope}")),
                f"data.tokenizer: {nope}: tokenizer model not found", "expected 'byte' or a sentencepiece .model file")


def test_tokenizer__corrupt(entry, capsys, tmp_path, text_file):
    entry.check(run_trainer(capsys, _fresh(tmp_path, f"data.tokenizer={text_file}")),
                f"data.tokenizer: {text_file}: not a sentencepiece model", "expected a .model file")


def test_tokenizer__dataset_mismatch(entry, capsys, tmp_path, byte_dataset, sp_model):
    out = run_trainer(capsys, _fresh(tmp_path, f"data.path={byte_dataset}", f"data.tokenizer={sp_model}",
                                  "model.vocab_size=512"))
    entry.check(out, f"{byte_dataset}.idx: tokenized with byte (vocab_size=256",
                "but the tokenizer is sp.model (vocab_size=400")


def test_tokenizer__vocab_exceeds_model(entry, capsys, tmp_path, sp_dataset, sp_model):
    out = run_trainer(capsys, _fresh(tmp_path, f"data.path={sp_dataset}", f"data.tokenizer={sp_model}",
                                  "model.vocab_size=300"))
    entry.check(out, f"model.vocab_size=300 is smaller than the vocabulary of tokenizer {sp_model} (400 ids)",
                "set model.vocab_size >= 400")


def test_tokenizer__train_vocab_too_small(entry, capsys, tmp_path, text_file):
    out = run_tool(capsys, "train_tokenizer", ["--input", text_file, "--model-prefix", tmp_path / "tok",
                                               "--vocab-size", "100"])
    entry.check(out, "vocab_size: expected more than 260", "got 100")
    assert not os.listdir(tmp_path)


# --- checkpoints ----------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(trained_run, tmp_path):
    """A private copy of the trained run's checkpoint directory (to damage)."""
    dst = tmp_path / "step_00000002"
    shutil.copytree(os.path.join(trained_run, CKPT), dst)
    return str(dst)


def _convert(capsys, source, out):
    return _unchanged_after(source, lambda: run_tool(capsys, "convert_checkpoint", [source, out]))


def test_checkpoint__not_a_checkpoint(entry, capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    out = _convert(capsys, str(tmp_path / "junk"), tmp_path / "out")
    entry.check(out, f"{tmp_path}/junk: not a megams checkpoint", "checkpoints/latest", "megams.json")
    assert not (tmp_path / "out").exists()


def test_checkpoint__bad_meta(entry, capsys, tmp_path, ckpt_copy):
    meta = os.path.join(ckpt_copy, "megams.json")
    with open(meta, "w") as f:
        f.write("{not json")
    entry.check(_convert(capsys, ckpt_copy, tmp_path / "out"), f"{meta}: not a megams checkpoint (JSONDecodeError")
    assert not (tmp_path / "out").exists()


def test_checkpoint__truncated_shard(entry, capsys, tmp_path, ckpt_copy):
    shard = os.path.join(ckpt_copy, "mp_rank_00_model_states.pt")
    os.truncate(shard, os.path.getsize(shard) // 2)
    entry.check(_convert(capsys, ckpt_copy, tmp_path / "out"), f"{shard}: truncated or corrupted checkpoint shard")
    assert not (tmp_path / "out").exists()


def test_checkpoint__missing_rank(entry, capsys, tmp_path, ckpt_copy):
    shard = os.path.join(ckpt_copy, "mp_rank_00_model_states.pt")
    os.remove(shard)
    entry.check(_convert(capsys, ckpt_copy, tmp_path / "out"), f"{shard}: missing (the manifest lists it")
    assert not (tmp_path / "out").exists()


def test_checkpoint__output_not_empty(entry, capsys, tmp_path, trained_run):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    out = _unchanged_after(str(out_dir), lambda: _convert(capsys, trained_run, out_dir))
    entry.check(out, f"{out_dir}: already exists and is not empty", "choose a new output directory")


def test_checkpoint__not_a_model_dir(entry, capsys, tmp_path, trained_run):
    out = _unchanged_after(trained_run, lambda: run_tool(capsys, "evaluate", [trained_run]))
    entry.check(out, f"{trained_run}: not a megams model directory (no config.json",
                "convert a training checkpoint with tools/convert_checkpoint.py")


def test_checkpoint__load_from_missing(entry, capsys, tmp_path, inputs):
    nope = tmp_path / "nope"
    out = run_trainer(capsys, trained_args(inputs, tmp_path / "run", f"checkpoint.load_from={nope}"))
    entry.check(out, f"checkpoint.load_from: {nope}: no such directory", "expected a training run or checkpoint "
                "directory")


def test_checkpoint__load_from_other_model(entry, capsys, tmp_path, inputs, trained_run):
    argv = trained_args(inputs, tmp_path / "run", f"checkpoint.load_from={trained_run}", "model.d_model=64")
    out = _unchanged_after(trained_run, lambda: run_trainer(capsys, argv))
    entry.check(out, f"checkpoint.load_from: {trained_run}: a different model (model.d_model=32 there, 64 here)")


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run (to resume)."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return str(dst)


def test_checkpoint__resume_other_model(entry, capsys, inputs, run_copy):
    out = _unchanged_after(run_copy, lambda: run_trainer(capsys, trained_args(inputs, run_copy, "model.d_model=64")))
    entry.check(out, f"checkpoint.resume: {os.path.join(run_copy, CKPT)}: a different model "
                "(model.d_model=32 there, 64 here)", "use a new training.run_dir")


def test_checkpoint__resume_other_layout(entry, capsys, inputs, run_copy):
    out = _unchanged_after(run_copy, lambda: run_trainer(capsys, trained_args(inputs, run_copy, "parallel.zero_stage=1")))
    ckpt = os.path.join(run_copy, CKPT)
    entry.check(out, f"checkpoint.resume: {ckpt}: saved with layout zero_stage=0, this run has zero_stage=1",
                f"checkpoint.load_from={ckpt}")


# --- the document and the tests agree --------------------------------------------------------------
EXIT_CODES = {"config": {"2"}, "data": {"2"}, "tokenizer": {"2"}, "checkpoint": {"2"},  # the exit codes of each area
              "integrity": {"2", "3"}, "runtime": {"4", "5", "128+N"}}
# catalogue tests that need real saves, ranks or signals live next to the code they test
ELSEWHERE = ["tests.training.test_checkpoint_integrity", "tests.training.test_nonfinite",
             "tests.distributed.test_watchdog", "tests.launch.test_preemption"]


def test_the_catalogue_and_the_tests_agree():
    entries = read_catalogue()
    assert len(entries) >= 25
    import importlib
    tests = set()
    for module in [sys.modules[__name__]] + [importlib.import_module(m) for m in ELSEWHERE]:
        tests |= {name for name in dir(module) if name.startswith("test_") and "__" in name}
    documented = {function_for(e) for e in entries}
    assert documented - tests == set(), f"entries of {DOC} without a test"
    assert tests - documented == set(), f"tests without an entry in {DOC}"
    for e in entries.values():
        area = e.id.split(".")[0]
        assert area in EXIT_CODES, f"{e.id}: area not one of {sorted(EXIT_CODES)}"
        assert e.exit in EXIT_CODES[area], f"{e.id}: exit code {e.exit}, expected one of {EXIT_CODES[area]}"
        assert e.message.startswith("error: ") and PLACEHOLDER.sub("", e.message).strip() != "error:", e


def test_the_message_shapes_are_strict():
    """A documented shape matches the message it describes and not a different one."""
    from tests.errors.catalogue import message_regex
    shape = message_regex("error: <file>: no such file (expected <what>)")
    assert shape.fullmatch("error: /a b/c.txt: no such file (expected text)")
    assert not shape.fullmatch("error: /a/c.txt: empty file (expected text)")
    assert not shape.fullmatch("error: /a/c.txt: no such file (expected text) and more")


def test_exit_codes_are_documented():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    for code, meaning in ((0, "finished"), (1, "internal error"), (2, "bad input")):
        assert f"| {code} | {meaning}" in text


def test_checkpoint__load_from_missing_parameter(entry, capsys, tmp_path, inputs, trained_run):
    """A checkpoint of an older megams: its megams.json record lacks a parameter this model has."""
    import json
    old = tmp_path / "old"
    shutil.copytree(os.path.join(trained_run, CKPT), old)
    meta = json.loads((old / "megams.json").read_text())
    rec = meta["parameters"]
    rec["plain"].pop("norm_f.bias")
    for r in rec["mp_ranks"]:
        r["params"] = [p for p in r["params"] if p[1] != "norm_f.bias"]
    (old / "megams.json").write_text(json.dumps(meta))
    argv = trained_args(inputs, tmp_path / "run", f"checkpoint.load_from={old}")
    out = _unchanged_after(str(old), lambda: run_trainer(capsys, argv))
    entry.check(out, f"checkpoint.load_from: {old}: has no parameter norm_f.bias (the model expects it; was it "
                "written by an older megams?)")


# --- data at scale and interoperability (issue 16) ------------------------------------------------
def test_config__evaluate_bad_number(entry, capsys, tmp_path):
    for option in ("--seq-len", "--stride", "--max-windows", "--batch-size"):
        out = run_tool(capsys, "evaluate", [tmp_path, option, "0"])
        entry.check(out, f"{option} 0", "expected an integer >= 1")


def test_config__evaluate_bad_split(entry, capsys, tmp_path):
    for split in ("a,b", "0.9,0.1", "0.5,-1,0.5"):
        entry.check(run_tool(capsys, "evaluate", [tmp_path, "--split", split]), f"--split {split}",
                    "three non-negative fractions")


def test_data__megatron_vocab_exceeded(entry, capsys, tmp_path):
    from tests.data.test_megatron import byte_docs, write_mmidx
    docs = byte_docs(["some text"] * 200)
    docs[7][3] = 300  # not a byte
    write_mmidx(str(tmp_path / "mega"), docs)
    out = run_trainer(capsys, _fresh(tmp_path, f"data.path={tmp_path / 'mega'}"))
    entry.check(out, f"{tmp_path / 'mega'}.bin: largest token id 300 >= vocabulary size 256", "data.tokenizer byte")


def test_data__eval_too_short(entry, capsys, tmp_path):
    from megams.checkpoint import save_model
    from megams.models import build_model
    from tests.models.cases import tiny
    save_model(build_model(tiny("vanilla", vocab_size=256, max_seq_len=64), seed=0).eval(), str(tmp_path / "m"))
    short = tmp_path / "short.txt"
    short.write_text("hello")  # 6 tokens with the eod: its valid part of 10% is empty
    out = run_tool(capsys, "evaluate", [tmp_path / "m", "--data", short, "--part", "valid", "--split", "0.9,0.1,0"])
    entry.check(out, f"--data {short}: the valid part (--split 0.9,0.1,0) holds 1 token(s) of 6",
                "too short for one window")


# --- the memory planner (issue 13) ------------------------------------------------------------------
def test_config__plan_build_rank(entry, capsys):
    config = os.path.join(os.path.dirname(DOC), "..", "configs", "tiny", "vanilla.yaml")
    out = run_tool(capsys, "plan_memory", ["--config", config, "--world", "4", "--build-rank", "4"])
    entry.check(out, "--build-rank 4", "outside the world of 4 ranks (0..3)")
