"""Reading ONE rank's share of a checkpoint: lazily, tensor by tensor, from memory-mapped files.

    src = open_source("runs/x/checkpoints/step_00000100")    # a training checkpoint or a model directory
    src.plain_shape("blocks.0.attn.wq.weight")               # [96, 32]: metadata only
    src.plan("blocks.0.attn.wq.weight", dim=0, start=48, length=48)   # which files / ranges (no tensor read)
    piece = src.read("blocks.0.attn.wq.weight", "param", dim=0, start=48, length=48)  # rows 48..95, fp32
    src.read(name, "exp_avg")                                # a whole AdamW moment (training checkpoints)

`read` returns the box of the FULL plain parameter that a target rank holds: indices
[start, start + length) along `dim` (the target's tensor-parallel slice; indices past the plain size,
a padded vocabulary, are zeros), everything along the other dims. It works out which source shards
hold that box from the layout record of megams.json (layout.py) and DeepSpeed's own metadata
(`param_shapes`, partition sizes), and copies out only those ranges:

- every `.pt` file is opened once with `torch.load(mmap=True, weights_only=True)` (only its pickle is
  read; tensors stay on disk until a range of them is copied), with the pickle allowlist of
  serialization.py; a model directory's `model.safetensors` is read per tensor and slice with
  `safetensors.safe_open`;
- a source shard stored whole (ZeRO-0 module / AdamW state, pipeline layer files) is sliced in place;
- a shard inside ZeRO's flat partitions (ZeRO-1/2: each param group flattened and cut into one range
  per data-parallel rank; ZeRO-3: each parameter cut on its own) is read from the partitions that
  cover its needed flat range, and from no others.
So a rank's peak memory while loading is its own shard plus one source tensor (`stats` counts it),
and resharding tp8*pp8 -> tp4*pp2 needs no process that holds the whole model.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megams.checkpoint.errors import CheckpointError
from megams.checkpoint.manifest import META_FILE

KINDS = ("param", "exp_avg", "exp_avg_sq")


def missing_parameter(source: str, name: str) -> CheckpointError:
    """The one message for a parameter the model has and the checkpoint lacks (e.g. added since)."""
    return CheckpointError(f"{source}: has no parameter {name} (the model expects it; was it written by an "
                           "older megams?)")


@dataclass
class ReadStats:
    """What the reader materialised: `returned` bytes handed to the caller (the rank's shard),
    `read` bytes copied out of files, `peak_transient` the largest scratch buffer of one read (at most
    one source shard of one tensor), `files` the files opened."""
    returned: int = 0
    read: int = 0
    peak_transient: int = 0
    reads: int = 0
    files: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """One range a read needs: `numel` elements from element `start` of the tensor at `entry` of `file`."""
    file: str
    entry: str
    start: int
    numel: int


# --- lazy files ------------------------------------------------------------------------------------------
def open_lazy(path: str):
    """torch.load(path, mmap=True, weights_only=True) with the DeepSpeed stand-ins of serialization.py:
    the pickle is read, tensors stay mapped on disk. Files not in torch's zip format load eagerly.
    Returns (state dict, whether its tensors are memory-mapped)."""
    from megams.checkpoint.serialization import _stand_ins, truncated
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    stand_ins = _stand_ins(path)
    try:
        with torch.serialization.safe_globals(stand_ins):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
            except RuntimeError as e:
                if "zipfile" not in str(e) and "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True), False  # legacy format: no mmap
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise truncated(path, e) from None


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:  # pragma: no cover
        return None


def drop_pages(t: torch.Tensor) -> None:
    """Unmap the pages under `t`, a view of a file mapped with torch.load(mmap=True) (MAP_PRIVATE) that
    was only read: they leave this process's RSS and would fault in again from the file. Never call it
    on memory that is not such a mapping (anonymous memory would read back as zeros)."""
    libc = _libc()
    if libc is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a, b = start // _PAGE * _PAGE, -(-end // _PAGE) * _PAGE
    libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


def _ranges(shape: Sequence[int]) -> List[Tuple[int, int]]:
    return [(0, int(s)) for s in shape]


def _intersect(a: List[Tuple[int, int]], b: List[Tuple[int, int]]) -> Optional[List[Tuple[int, int]]]:
    out = [(max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b)]
    return None if any(lo >= hi for lo, hi in out) else out


def _strides(shape: Sequence[int]) -> List[int]:
    st, acc = [], 1
    for s in reversed(list(shape)):
        st.append(acc)
        acc *= int(s)
    return list(reversed(st))


def _flat_span(shape: Sequence[int], box: List[Tuple[int, int]]) -> Tuple[int, int]:
    """[first, end) flat range (row-major `shape`) that covers `box`."""
    st = _strides(shape)
    first = sum(lo * s for (lo, _), s in zip(box, st))
    last = sum((hi - 1) * s for (_, hi), s in zip(box, st))
    return first, last + 1


class Source:
    """Common part: plain names, shapes, and box arithmetic. Subclasses say where a shard lives."""
    path: str
    optimizer: bool = False

    def __init__(self):
        self.stats = ReadStats()

    # what subclasses provide
    def plain_shape(self, name: str) -> List[int]:
        raise NotImplementedError

    def names(self) -> List[str]:
        raise NotImplementedError

    def _shards(self, name: str, kind: str) -> List[Tuple[List[Tuple[int, int]], list, object]]:
        """[(box of the full padded parameter this shard covers, its local shape, handle)]."""
        raise NotImplementedError

    def _pieces(self, handle, kind: str, first: int, end: int) -> List[Piece]:
        raise NotImplementedError

    def _copy(self, handle, kind: str, first: int, end: int) -> Tuple[torch.Tensor, bool]:
        """Flat elements [first, end) of one shard (a view where possible, else one scratch buffer),
        and whether it is a view of a memory-mapped file."""
        raise NotImplementedError

    # the public part
    def has(self, name: str) -> bool:
        return name in self.names()

    def _box(self, name: str, dim: Optional[int], start: int, length: Optional[int]) -> List[Tuple[int, int]]:
        full = _ranges(self.plain_shape(name))
        if dim is None:
            return full
        if length is None:
            length = full[dim][1] - start
        full[dim] = (int(start), int(start) + int(length))
        return full

    def _needed(self, name, kind, dim, start, length):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
        if not self.has(name):
            raise missing_parameter(self.path, name)
        want = self._box(name, dim, start, length)
        crop = _ranges(self.plain_shape(name))
        for shard_box, local_shape, handle in self._shards(name, kind):
            got = _intersect(want, shard_box)
            got = None if got is None else _intersect(got, crop)
            if got is None:  # ([] is a 0-d parameter's whole box)
                continue
            local = [(lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(got, shard_box)]
            yield want, got, local, local_shape, handle

    def plan(self, name: str, kind: str = "param", dim: Optional[int] = None, start: int = 0,
             length: Optional[int] = None) -> List[Piece]:
        """Which file ranges `read` would copy (metadata only)."""
        out = []
        for _, _, local, shape, handle in self._needed(name, kind, dim, start, length):
            out += self._pieces(handle, kind, *_flat_span(shape, local))
        return out

    def read(self, name: str, kind: str = "param", dim: Optional[int] = None, start: int = 0,
             length: Optional[int] = None) -> torch.Tensor:
        """The box [start, start + length) along `dim` (all of it when dim is None) of the full plain
        parameter, fp32, zero where it lies past the plain shape (padding)."""
        want = self._box(name, dim, start, length)
        out = torch.zeros([hi - lo for lo, hi in want], dtype=torch.float32)
        for want, got, local, shape, handle in self._needed(name, kind, dim, start, length):
            first, end = _flat_span(shape, local)
            flat, mapped = self._copy(handle, kind, first, end)
            view = flat.as_strided([hi - lo for lo, hi in local], _strides(shape), flat.storage_offset())
            dst = out
            for d, ((lo, hi), (w0, _)) in enumerate(zip(got, want)):
                dst = dst.narrow(d, lo - w0, hi - lo)
            dst.copy_(view)
            if mapped:  # the file pages it came from leave the RSS: only the copy stays
                drop_pages(flat)
            self.stats.read += (end - first) * flat.element_size()
        self.stats.returned += out.numel() * out.element_size()
        self.stats.reads += 1
        return out


# --- a training checkpoint ---------------------------------------------------------------------------------
@dataclass
class _Shard:
    """Where one engine-named, tensor-parallel-local parameter of one mp rank lives."""
    mp: int
    tp: int
    name: str
    shape: List[int]
    dim: Optional[int]
    layer: Optional[list]


class CheckpointSource(Source):
    """A megams training checkpoint (any dp / tp / pp / ZeRO stage / precision), read lazily."""

    def __init__(self, ckpt: str, meta: dict, record: dict):
        super().__init__()
        from megams.checkpoint.reader import _Files
        self.path, self.meta, self.record = ckpt, meta, record
        self.files = _Files(ckpt, meta, record)
        self.zero, self.dp, self.tp = self.files.zero, self.files.dp, self.files.tp
        self._open: Dict[str, object] = {}
        self._mapped: set = set()
        self._zmeta: Dict[int, dict] = {}
        tied = record["tied"]
        self.index: Dict[str, Dict[int, _Shard]] = {}
        self.ranks = {r["mp_rank"]: r for r in record["mp_ranks"]}
        for rec in record["mp_ranks"]:
            for name, plain, shape, dim, layer in rec["params"]:
                plain = tied.get(plain, plain)  # a stage's copy of a tied weight is the same weight
                self.index.setdefault(plain, {}).setdefault(
                    rec["tp"], _Shard(rec["mp_rank"], rec["tp"], name, list(shape), dim, layer))  # first stage wins

    # files
    def load(self, path: str):
        if path not in self._open:
            sd, mapped = open_lazy(path)
            if mapped:
                self._mapped.add(path)
            if not isinstance(sd, dict) or not (("module" in sd) or ("optimizer_state_dict" in sd)
                                                or "layer_" in os.path.basename(path)):
                raise CheckpointError(f"{path}: truncated or corrupted checkpoint shard (not a DeepSpeed state dict)")
            self._open[path] = sd
            self.stats.files.append(path)
        return self._open[path]

    @property
    def optimizer(self) -> bool:
        """Whether AdamW state is there (ZeRO >= 1: always; ZeRO-0: in the model files, asked of one
        already open, so that a rank opens no file it does not need)."""
        if self.zero >= 1:
            return True
        opened = [f for f in (self.files.model_file(m) for m in self.ranks) if f in self._open]
        return self.load(opened[0] if opened else self.files.model_file(min(self.ranks))).get("optimizer") is not None

    # names
    def names(self) -> List[str]:
        return list(self.record["plain"])

    def has(self, name: str) -> bool:
        return name in self.record["plain"]

    def plain_shape(self, name: str) -> List[int]:
        if name not in self.record["plain"]:
            raise missing_parameter(self.path, name)
        return list(self.record["plain"][name])

    def _shards(self, name, kind):
        got = self.index.get(name)
        if not got:
            raise CheckpointError(f"{self.path}: no shard holds parameter {name}")
        full = self.plain_shape(name)
        dims = {s.dim for s in got.values()}
        if dims == {None}:
            s = got[min(got)]
            return [(_ranges(s.shape), s.shape, s)]
        if len(dims) != 1 or sorted(got) != list(range(self.tp)):
            raise CheckpointError(f"{self.path}: parameter {name} has shards of tensor ranks {sorted(got)} "
                                  f"(partition dims {sorted(d for d in dims if d is not None)}), expected "
                                  f"ranks 0..{self.tp - 1} along one dim")
        dim = dims.pop()
        out = []
        for t in range(self.tp):
            s = got[t]
            if [n for i, n in enumerate(s.shape) if i != dim] != [n for i, n in enumerate(full) if i != dim] or \
                    s.shape[dim] * self.tp < full[dim]:
                raise CheckpointError(f"{self.path}: parameter {name} assembles to shape "
                                      f"{[n * (self.tp if i == dim else 1) for i, n in enumerate(s.shape)]}, "
                                      f"the model has {full}")
            box = _ranges(s.shape)
            box[dim] = (t * s.shape[dim], (t + 1) * s.shape[dim])
            out.append((box, s.shape, s))
        return out

    # where a shard's elements are
    def _zero_meta(self, m: int) -> dict:
        """Per mp rank: engine name -> (group, offset in the group's flat, numel), and partition sizes."""
        if m in self._zmeta:
            return self._zmeta[m]
        model_sd = self.load(self.files.model_file(m))
        shapes = model_sd.get("param_shapes")
        opt0 = self.load(self.files.optim_file(m, 0))["optimizer_state_dict"]
        where = {}
        if self.zero == 3:
            sizes = [int(t.numel()) for t in opt0["fp32_flat_groups"]]
            off = 0
            for g, group in enumerate(shapes):
                for name, shape in group.items():
                    n = math.prod(int(x) for x in shape)
                    part = math.ceil(n / self.dp)
                    where[name] = (g, off, n, part)
                    off += part
            if off > sum(sizes):
                raise CheckpointError(f"{self.path} (model-parallel rank {m}): ZeRO-3 partitions hold {sum(sizes)} "
                                      f"elements per rank, fewer than its parameters need ({off})")
            info = {"where": where, "sizes": sizes}
        else:
            pads = opt0.get("param_alignment_paddings")
            sizes = [int(t.numel()) for t in opt0["single_partition_of_fp32_groups"]]
            for g, group in enumerate(shapes):
                off = 0
                gp = pads[g] if pads is not None else [0] * len(group)
                for (name, shape), pad in zip(group.items(), gp):
                    n = math.prod(int(x) for x in shape)
                    where[name] = (g, off, n, None)
                    off += n + int(pad)
                if g >= len(sizes) or off > self.dp * sizes[g]:
                    held = self.dp * sizes[g] if g < len(sizes) else 0
                    raise CheckpointError(f"{self.path} (model-parallel rank {m}): ZeRO partitions of param group {g} "
                                          f"hold {held} elements, fewer than its parameters need ({off})")
            info = {"where": where, "sizes": sizes}
        self._zmeta[m] = info
        return info

    def _in_zero(self, s: _Shard) -> bool:
        return self.zero >= 1 and s.name in self._zero_meta(s.mp)["where"]

    def _zero0_state(self, s: _Shard) -> dict:
        sd = self.load(self.files.model_file(s.mp))
        osd = sd["optimizer"]
        rec = self.ranks[s.mp]
        for names, group in zip(rec["groups"], osd["param_groups"]):
            if len(names) != len(group["params"]):
                raise CheckpointError(f"{self.path} (model-parallel rank {s.mp}): optimizer group holds "
                                      f"{len(group['params'])} parameters, the layout record {len(names)}")
            if s.name in names:
                st = osd["state"].get(group["params"][names.index(s.name)])
                if not st:
                    raise CheckpointError(f"{self.path} (model-parallel rank {s.mp}): no AdamW state for {s.name}")
                return st
        raise CheckpointError(f"{self.path} (model-parallel rank {s.mp}): {s.name} is in no optimizer group")

    def _whole(self, s: _Shard, kind: str) -> Tuple[str, str, torch.Tensor]:
        """(file, entry, tensor) of a shard stored whole (ZeRO-0 / pipeline layer files)."""
        if kind != "param":
            f = self.files.model_file(s.mp)
            return f, f"optimizer.state[{s.name}].{kind}", self._zero0_state(s)[kind]
        if s.layer is not None:
            f = self.files.layer_file(s.layer[0], s.tp)
            sd = self.load(f)
            if s.layer[1] not in sd:
                raise CheckpointError(f"{self.path} (model-parallel rank {s.mp}): layer file of layer {s.layer[0]} "
                                      f"has no {s.layer[1]!r}")
            return f, s.layer[1], sd[s.layer[1]]
        f = self.files.model_file(s.mp)
        module = self.load(f).get("module") or {}
        if s.name not in module:
            raise CheckpointError(f"{f}: truncated or corrupted checkpoint shard (missing entry {s.name!r})")
        return f, f"module.{s.name}", module[s.name]

    def _partition(self, m: int, d: int, g: int, kind: str) -> Tuple[str, str, torch.Tensor]:
        f = self.files.optim_file(m, d)
        osd = self.load(f)["optimizer_state_dict"]
        try:
            if self.zero == 3:
                t = osd["fp32_flat_groups"][g] if kind == "param" else osd["optimizer_state_dict"]["state"][g][kind]
            else:
                t = osd["single_partition_of_fp32_groups"][g] if kind == "param" else \
                    osd["base_optimizer_state"]["state"][g][kind]
        except (KeyError, IndexError) as e:
            raise CheckpointError(f"{f}: truncated or corrupted checkpoint shard (missing entry {e})") from None
        return f, (f"group {g} fp32" if kind == "param" else f"group {g} {kind}"), t

    def _zero_ranges(self, s: _Shard, kind: str, first: int, end: int):
        """[(file, entry, tensor, start, numel)] covering flat [first, end) of shard s."""
        info = self._zero_meta(s.mp)
        g, off, n, part = info["where"][s.name]
        out = []
        if self.zero == 3:  # element e of the parameter: rank e // part, at off + e % part of its flat groups
            e = first
            while e < end:
                d, k = divmod(e, part)
                take = min(end - e, part - k)
                pos = off + k  # within the concatenation of this rank's groups
                for gi, size in enumerate(info["sizes"]):
                    if pos < size:
                        break
                    pos -= size
                f, entry, t = self._partition(s.mp, d, gi, kind)
                out.append((f, entry, t, pos, take))
                e += take
        else:  # the group flat is the concatenation of the dp ranks' partitions
            size = info["sizes"][g]
            a, b = off + first, off + end
            while a < b:
                d, k = divmod(a, size)
                take = min(b - a, size - k)
                f, entry, t = self._partition(s.mp, d, g, kind)
                out.append((f, entry, t, k, take))
                a += take
        return out

    def _pieces(self, s, kind, first, end):
        if self._in_zero(s):
            return [Piece(os.path.basename(f), e, a, n) for f, e, _, a, n in self._zero_ranges(s, kind, first, end)]
        f, entry, _ = self._whole(s, kind)
        return [Piece(os.path.basename(f), entry, first, end - first)]

    def _copy(self, s, kind, first, end):
        if self._in_zero(s):
            ranges = self._zero_ranges(s, kind, first, end)
            if len(ranges) == 1 and ranges[0][2].dtype == torch.float32:
                f, _, t, a, n = ranges[0]
                return t.reshape(-1).narrow(0, a, n), f in self._mapped
            buf = torch.empty(end - first, dtype=torch.float32)
            self.stats.peak_transient = max(self.stats.peak_transient, buf.numel() * 4)
            pos = 0
            for f, _, t, a, n in ranges:
                part = t.reshape(-1).narrow(0, a, n)
                buf.narrow(0, pos, n).copy_(part)
                if f in self._mapped:
                    drop_pages(part)
                pos += n
            return buf, False
        f, _, t = self._whole(s, kind)
        flat = t.reshape(-1).narrow(0, first, end - first)
        if flat.dtype != torch.float32:
            wide = flat.float()
            self.stats.peak_transient = max(self.stats.peak_transient, wide.numel() * 4)
            if f in self._mapped:
                drop_pages(flat)
            return wide, False
        return flat, f in self._mapped

    def adam_step(self) -> Optional[int]:
        """The optimizer's own step count, if the mp ranks agree (None without optimizer state). Asked
        of the ranks whose files are already open (a rank reading its share), else of all."""
        if not self.optimizer:
            return None
        steps = set()
        which = self.files.model_file if self.zero == 0 else (lambda m: self.files.optim_file(m, 0))
        opened = [m for m in self.ranks if which(m) in self._open]
        for m in opened or list(self.ranks):
            if self.zero == 0:
                st = self.load(self.files.model_file(m))["optimizer"]["state"]
                first = next(iter(st.values()), {})
            else:
                osd = self.load(self.files.optim_file(m, 0))["optimizer_state_dict"]
                base = osd["optimizer_state_dict"] if self.zero == 3 else osd["base_optimizer_state"]
                first = base["state"].get(0, {})
            if "step" in first:
                step = first["step"]
                steps.add(int(step.item()) if torch.is_tensor(step) else int(step))
        return steps.pop() if len(steps) == 1 else None


# --- a plain-torch model directory ---------------------------------------------------------------------------
class PretrainedSource(Source):
    """model.safetensors (safe_open, per tensor and slice) or model.pt (mmap) of a model directory."""

    def __init__(self, path: str):
        super().__init__()
        from megams.checkpoint.pretrained import weights_file
        self.path = weights_file(path)
        if self.path is None:
            raise CheckpointError(f"{path}: no weights (model.safetensors or model.pt)")
        self.stats.files.append(self.path)
        try:
            if self.path.endswith(".safetensors"):
                from safetensors import safe_open
                self._st = safe_open(self.path, framework="pt", device="cpu")
                self._shapes = {n: list(self._st.get_slice(n).get_shape()) for n in self._st.keys()}
                self._pt = None
            else:
                self._st = None
                self._pt = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)  # zip only
                if not isinstance(self._pt, dict) or not all(torch.is_tensor(v) for v in self._pt.values()):
                    raise CheckpointError(f"{self.path}: expected a dict of named tensors")
                self._shapes = {n: list(t.shape) for n, t in self._pt.items()}
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: truncated or corrupted weights file ({detail})") from None

    def names(self):
        return list(self._shapes)

    def has(self, name):
        return name in self._shapes

    def plain_shape(self, name):
        if name not in self._shapes:
            raise missing_parameter(self.path, name)
        return self._shapes[name]

    def _shards(self, name, kind):
        if kind != "param":
            raise CheckpointError(f"{self.path}: a model directory holds no optimizer state")
        shape = self._shapes[name]
        return [(_ranges(shape), shape, name)]

    def _pieces(self, name, kind, first, end):
        return [Piece(os.path.basename(self.path), name, first, end - first)]

    def read(self, name, kind="param", dim=None, start=0, length=None):
        if self._st is None or not self.has(name):
            return super().read(name, kind, dim, start, length)
        # safetensors slices along any dim without reading the rest of the tensor
        want = self._box(name, dim, start, length)
        shape = self._shapes[name]
        out = torch.zeros([hi - lo for lo, hi in want], dtype=torch.float32)
        got = _intersect(want, _ranges(shape))
        if got is not None:
            part = self._st.get_slice(name)[tuple(slice(lo, hi) for lo, hi in got)] if shape else \
                self._st.get_tensor(name)
            dst = out
            for d, ((lo, hi), (w0, _)) in enumerate(zip(got, want)):
                dst = dst.narrow(d, lo - w0, hi - lo)
            dst.copy_(part)
            self.stats.read += part.numel() * part.element_size()
            self.stats.peak_transient = max(self.stats.peak_transient, part.numel() * part.element_size())
        self.stats.returned += out.numel() * 4
        self.stats.reads += 1
        return out

    def _copy(self, name, kind, first, end):
        flat = self._pt[name].reshape(-1).narrow(0, first, end - first)
        if flat.dtype == torch.float32:
            return flat, True
        wide = flat.float()
        drop_pages(flat)
        return wide, False


def open_checkpoint(path: str, checksums: bool = False) -> CheckpointSource:
    """A training checkpoint (run directory: its latest), checked against its manifest (sizes; sha256
    with `checksums=True`), opened lazily: no tensor is read until `read`."""
    from megams.checkpoint.manifest import verify
    from megams.checkpoint.reader import parameter_record, read_meta, resolve_checkpoint
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify(ckpt, meta, checksums=checksums)
    try:
        record = parameter_record(meta)
    except CheckpointError as e:
        raise CheckpointError(f"{os.path.join(ckpt, META_FILE)}: {e}") from None
    return CheckpointSource(ckpt, meta, record)


def open_source(path: str, checksums: bool = False) -> Source:
    from megams.checkpoint.pretrained import is_pretrained_dir
    if os.path.isdir(path) and is_pretrained_dir(path):
        return PretrainedSource(path)
    return open_checkpoint(path, checksums)


__all__ = ["open_source", "open_checkpoint", "CheckpointSource", "PretrainedSource", "Source", "Piece",
           "ReadStats", "missing_parameter", "open_lazy"]
