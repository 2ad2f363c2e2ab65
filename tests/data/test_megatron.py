"""Megatron-LM / GPT-NeoX datasets (MMIDIDX): read as they are, written by tools/preprocess_data.py
--format megatron, converted both ways. The reference is megatron-core's own IndexedDataset /
IndexedDatasetBuilder (a test-only dependency: requirements-test.txt) and, for training, a short writer
of the layout written here from its description (not megams' code)."""
import os
import struct
import warnings

import numpy as np
import pytest

from megams.config import DataConfig
from megams.data import DataError, IndexedDataset, MegatronIndexedDataset, build_data, eval_batches, load_tokenizer
from megams.data.indexed import check_tokenizer
from megams.data.preprocess import convert, preprocess
from tests.training.common import losses, read_metrics, tiny_args

TEXTS = ["hello world", "a second document, caf\u00e9 \u2603", "x" * 300, "line one\nline two", "z"]


def megatron_core():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def write_mmidx(prefix, docs, dtype=np.uint16, code=8):
    """An independent MMIDIDX writer, from the layout's description: one sequence per document."""
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize)])
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes() + np.arange(len(docs) + 1).tobytes())


def byte_docs(texts):
    return [list(t.encode("utf-8")) + [0] for t in texts]


def test_reads_what_megatron_core_writes(tmp_path):
    mc = megatron_core()
    import torch
    docs = byte_docs(TEXTS)
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in docs[:3]:
        builder.add_item(torch.tensor(d))
        builder.end_document()
    builder.add_document(torch.tensor(docs[3] + docs[4]), [len(docs[3]), len(docs[4])])  # 2 sequences, 1 document
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert isinstance(ds, MegatronIndexedDataset) and ds.dtype == np.uint16
    assert len(ds) == 4 and ds.n_tokens == sum(map(len, docs))
    for i in range(3):
        assert ds.doc(i).tolist() == docs[i]
    assert ds.doc(3).tolist() == docs[3] + docs[4]
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    check_tokenizer(ds, load_tokenizer("byte"))
    assert ds.doc_bytes.tolist() == [len(t.encode()) for t in TEXTS[:3]] + [len((TEXTS[3] + TEXTS[4]).encode())]


def test_megatron_core_reads_what_we_write(tmp_path, write, sp_model):
    mc = megatron_core()
    text = write("t.txt", "\n\n".join(TEXTS))
    for tok in ("byte", sp_model):
        ours = preprocess([text], str(tmp_path / "ours"), tok, workers=1, progress=False)
        mega = preprocess([text], str(tmp_path / "mega"), tok, workers=2, progress=False, format="megatron")
        ref = mc.IndexedDataset(str(tmp_path / "mega"))
        assert len(ref) == len(ours) == len(TEXTS)
        assert ref.index.dtype == np.uint16  # Megatron's own choice for these vocabularies
        for i in range(len(ours)):
            assert ref[i].tolist() == ours.doc(i).tolist()
        assert list(ref.document_indices) == list(range(len(TEXTS) + 1))
        assert mega.tokens.tolist() == ours.tokens.tolist()


def test_converts_both_ways_byte_identical(tmp_path, sp_model):
    tok = load_tokenizer(sp_model)
    docs = [tok.encode(t) + [tok.eod_id] for t in TEXTS]
    write_mmidx(str(tmp_path / "orig"), docs)
    as_megams = convert(str(tmp_path / "orig"), str(tmp_path / "m"), "megams", sp_model, progress=False)
    assert as_megams.format == "megams" and as_megams.meta["tokenizer_fingerprint"] == tok.fingerprint
    assert as_megams.doc_bytes.tolist() == [len(t.encode()) for t in TEXTS]  # decoded = the source (lossless)
    assert [as_megams.doc(i).tolist() for i in range(len(docs))] == docs
    convert(str(tmp_path / "m"), str(tmp_path / "back"), "megatron", progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"back{ext}").read_bytes() == (tmp_path / f"orig{ext}").read_bytes()


def test_bits_per_byte_by_decoding_equals_the_recorded_bytes(tmp_path, write, sample_text, sp_model):
    text = write("s.txt", sample_text)
    for tok in ("byte", sp_model):
        ours = preprocess([text], str(tmp_path / "ours"), tok, workers=1, progress=False)
        mega = preprocess([text], str(tmp_path / "mega"), tok, workers=1, progress=False, format="megatron")
        assert isinstance(mega, MegatronIndexedDataset)
        per = []
        for prefix in ("ours", "mega"):
            cfg = DataConfig(path=str(tmp_path / prefix), tokenizer=tok, cache_dir=str(tmp_path / "cache"))
            bundle = build_data(cfg, 32, 0, progress=False)
            per.append(eval_batches(bundle.valid, 4, 8).bytes_per_token)
        assert per[1] == pytest.approx(per[0], rel=1e-12) and 0 < per[0]


def test_unknown_tokenizer_gives_no_bytes(tmp_path):
    write_mmidx(str(tmp_path / "m"), byte_docs(TEXTS * 20))
    from megams.data import GPTDataset
    ds = GPTDataset(IndexedDataset(str(tmp_path / "m")), 8, shuffle=False)  # no tokenizer attached
    assert eval_batches(ds, 2, 4).bytes_per_token is None


def test_vocabulary_checked_against_the_largest_id(tmp_path, sp_model):
    docs = byte_docs(TEXTS)
    docs[2][5] = 500
    write_mmidx(str(tmp_path / "m"), docs)
    cfg = DataConfig(path=str(tmp_path / "m"), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        build_data(cfg, 8, 0, progress=False)
    assert str(e.value) == (f"{tmp_path}/m.bin: largest token id 500 >= vocabulary size 256 of data.tokenizer "
                            "byte (expected the tokenizer this Megatron dataset was made with)")
    assert any(n.startswith("megatron-scan-") for n in os.listdir(tmp_path / "cache"))  # scanned once, cached
    check_tokenizer(IndexedDataset(str(tmp_path / "m")), load_tokenizer(sp_model))  # 512 ids: fits


def test_bad_megatron_files(tmp_path):
    def msg(prefix):
        with pytest.raises(DataError) as e:
            check_tokenizer(IndexedDataset(prefix), load_tokenizer("byte"))
        return str(e.value)

    p = str(tmp_path / "m")
    write_mmidx(p, byte_docs(TEXTS))
    size = os.path.getsize(p + ".idx")
    os.truncate(p + ".idx", size - 4)
    assert msg(p) == f"{p}.idx: truncated or corrupted index ({size - 4} bytes, the header says {size})"
    write_mmidx(p, byte_docs(TEXTS))
    os.truncate(p + ".bin", 10)
    assert msg(p).startswith(f"{p}.bin: truncated or corrupted (10 bytes, the index says ")
    write_mmidx(p, byte_docs(TEXTS), dtype=np.float32, code=7)
    assert msg(p) == f"{p}.idx: Megatron index with float32 (not token ids), expected integer token ids"
    write_mmidx(p, byte_docs(TEXTS))
    raw = bytearray(open(p + ".idx", "rb").read())
    ptr = 34 + 4 * len(TEXTS) + 8 * 2  # the third sequence's pointer, moved 2 bytes on
    raw[ptr:ptr + 8] = struct.pack("<q", struct.unpack("<q", raw[ptr:ptr + 8])[0] + 2)
    open(p + ".idx", "wb").write(bytes(raw))
    assert "sequence 2 starts at byte" in msg(p) and "expected" in msg(p)


def test_megatron_dataset_trains(tmp_path, capsys):
    """launch/pretrain.py --set data.path=PREFIX on a dataset from the independent writer: loss falls,
    val_bpb is reported (from the decoded bytes)."""
    from megams.data import builtin_corpus
    from megams.training.trainer import main
    write_mmidx(str(tmp_path / "corpus"), byte_docs(builtin_corpus().documents[:30]))
    run = tmp_path / "run"
    argv = tiny_args("vanilla", str(run), steps=12, extra=[
        f"data.path={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}", "training.eval_interval=12",
        "optimizer.lr=0.003"])
    assert main(argv) == 0
    loss = losses(str(run))
    assert len(loss) == 12 and np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.3, loss
    evals = read_metrics(str(run))[1]
    assert evals and evals[-1]["val_bpb"] is not None and 0 < evals[-1]["val_bpb"] < 9
