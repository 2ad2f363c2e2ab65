"""Tokenizers: bytes (no training) or a sentencepiece model, behind one small interface.

Every tokenizer has `name`, `vocab_size`, `eod_id`, `fingerprint`, `encode(str) -> list[int]` and
`decode(ids) -> str`. `eod_id` is the end-of-document token appended after every document; `decode`
drops it (as sentencepiece drops control pieces). `fingerprint` is a stable string that identifies the
exact vocabulary ("byte", or "sentencepiece:" + sha256 of the model without its training options): an
indexed dataset records it, and a dataset is only used with the tokenizer that made it.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Iterable, Iterator, List, Optional, Sequence

from megams.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to train, nothing to download.

    The end-of-document id is 0, the NUL byte. That is safe because NUL never appears in accepted text:
    `megams.data.sources` refuses files and JSONL records that contain it (a NUL means binary data).
    """

    name = "byte"
    vocab_size = 256
    eod_id = 0
    fingerprint = "byte"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Model output may cut a multi-byte character: show U+FFFD rather than fail.
        return bytes(i for i in ids if i != self.eod_id).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained sentencepiece model (BPE or unigram). End of document = the model's eos piece."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = os.path.abspath(model_path)
        data = _read_model_file(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError):
            raise DataError(f"{model_path}: not a sentencepiece model (its protobuf does not parse), expected a "
                            ".model file written by tools/train_tokenizer.py or sentencepiece") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"{model_path}: the sentencepiece model has no eos piece, which megams uses as "
                            "end-of-document (train it with tools/train_tokenizer.py)")
        self.name = os.path.basename(model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        self.fingerprint = "sentencepiece:" + hashlib.sha256(_without_trainer_spec(data)).hexdigest()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self):  # the processor is rebuilt from the file (workers, deepcopy)
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r})"


def load_tokenizer(spec: str):
    """'byte' -> ByteTokenizer; a path to a .model file -> SentencePieceTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)


def _read_model_file(path: str) -> bytes:
    if not os.path.exists(path):
        raise DataError(f"{path}: tokenizer model not found (expected 'byte' or a sentencepiece .model file)")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory (expected 'byte' or a sentencepiece .model file)")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise DataError(f"{path}: empty file (expected a sentencepiece .model file)")
    return data


def _without_trainer_spec(model: bytes) -> bytes:
    """The model file minus its trainer_spec (ModelProto field 2): what encoding depends on (pieces, scores,
    normalizer), not where or when it was trained, so a retrained identical model has the same fingerprint.
    Walks the top level of the protobuf wire format; anything unexpected -> the whole file."""
    def varint(i):
        value = shift = 0
        while True:
            b = model[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return value, i

    out, i = bytearray(), 0
    try:
        while i < len(model):
            start = i
            key, i = varint(i)
            wire = key & 7
            if wire == 0:
                _, i = varint(i)
            elif wire == 2:
                n, i = varint(i)
                i += n
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                return model
            if key >> 3 != 2:
                out += model[start:i]
    except IndexError:
        return model
    return bytes(out) if i == len(model) else model


def _short(err: Exception) -> str:
    """First line of a sentencepiece error, without its C++ location ("INTERNAL: src/x.cc(7) [check] ")."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    return re.sub(r"^[A-Z_]+: \S+\.cc\(\d+\) \[.*?\] ", "", text.splitlines()[0])


# training -----------------------------------------------------------------------------------------

_MAX_SENTENCE_BYTES = 4096


def _training_pieces(documents: Iterable[str]) -> Iterator[str]:
    """Documents as sentencepiece "sentences": whole lines, newline kept (so newline gets its own pieces),
    packed up to 4 KiB (sentencepiece skips longer sentences)."""
    for doc in documents:
        buf, size = [], 0
        for line in (doc + "\n").splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > _MAX_SENTENCE_BYTES:
                yield "".join(buf)
                buf, size = [], 0
            while n > _MAX_SENTENCE_BYTES:  # one very long line: cut it (characters, not bytes: safe)
                cut = _MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
                n = len(line.encode("utf-8"))
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def train_sentencepiece(inputs: Optional[Sequence[str]], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", doc_sep: str = "blank_line", text_key: str = "text",
                        character_coverage: float = 1.0, input_sentence_size: int = 0, num_threads: int = 1,
                        seed: int = 0) -> str:
    """Train a sentencepiece model on text/JSONL files (`inputs`; None = the built-in corpus).

    Writes `model_prefix.model` and `.vocab` and returns the .model path. Settings chosen for language
    modelling: identity normalization and no dummy prefix (decode(encode(x)) == x for any text),
    byte_fallback (no unknown tokens), bos disabled, eos (id 1) used as end-of-document, digits split.
    `input_sentence_size` > 0 samples that many training pieces (seeded) from a large corpus.
    """
    import sentencepiece as spm

    from megams.data.corpus import builtin_corpus
    from megams.data.sources import read_documents

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size <= 260:
        raise DataError(f"vocab_size: expected more than 260 (256 byte-fallback pieces + unk + eos), got {vocab_size}")
    if inputs is None:
        documents: Iterable[str] = builtin_corpus().documents
    else:
        readers = [read_documents(p, doc_sep=doc_sep, text_key=text_key) for p in inputs]  # checks files now
        documents = (doc for r in readers for doc in r)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)

    failed: List[DataError] = []

    def pieces():  # a DataError raised inside sentencepiece's C++ loop would lose its message: carry it out
        try:
            yield from _training_pieces(documents)
        except DataError as e:
            failed.append(e)

    # Train under a temporary name and move into place: a failed run never leaves a model behind.
    tmp_prefix = f"{model_prefix}.tmp-{os.getpid()}"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=pieces(), model_prefix=tmp_prefix,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True, unk_id=0, eos_id=1, bos_id=-1,
            pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
            max_sentence_length=_MAX_SENTENCE_BYTES * 4, minloglevel=2)
        if failed:
            raise failed[0]
        os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", model_prefix + ".model")
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise DataError(f"{model_prefix}.model: sentencepiece training failed: {_short(e)}") from None
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return model_prefix + ".model"


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """The model's embedding must have a row for every token id the tokenizer can produce."""
    if tokenizer.vocab_size > model_vocab_size:
        source = getattr(tokenizer, "model_path", tokenizer.name)
        raise DataError(f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of tokenizer {source} "
                        f"({tokenizer.vocab_size} ids): set model.vocab_size >= {tokenizer.vocab_size}")


__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer", "train_sentencepiece", "check_vocab"]
