"""Build the next steps' batches in a background thread, and copy them to the device ahead of time.

    with Prefetcher(source, device, depth=cfg.data.prefetch) as batches:
        for step_batches in batches:          # a list of (inputs, targets), already on `device`
            ...

`source` is any iterator of lists of (inputs, targets) CPU tensors (one list per optimizer step, one
pair per micro-batch, as `GlobalBatches.next()` returns). With `depth` > 0 a daemon thread pulls up
to `depth` steps ahead of the consumer. On CUDA it pins each tensor's host memory and issues the
host-to-device copies `non_blocking` on a side stream; the consumer's stream waits for that copy's
event before it uses the tensors, and `record_stream` tells the caching allocator that the
consumer's stream uses them, so their memory is not reused under it. On CPU only the building is
moved off the loop. `depth=0` is the synchronous path (built and copied in `__next__`).

An exception raised by `source` in the thread is raised again in the consumer, at the step it
would have been raised synchronously (after the steps built before it). `close()` (or leaving the
`with` block) stops the thread and joins it, even when it is blocked on a full queue.

The data position: the thread runs ahead of training, so a checkpoint must record what the
consumer took (`delivered` steps), not how far `source` got.
"""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Iterable, Iterator, List, Optional, Tuple

import torch

Batch = Tuple[torch.Tensor, torch.Tensor]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    def __init__(self, source: Iterable[List[Batch]], device, depth: int = 2, pin_memory: Optional[bool] = None,
                 name: str = "megams-prefetch"):
        if depth < 0:
            raise ValueError(f"data.prefetch: expected a number of steps >= 0, got {depth}")
        self.device = torch.device(device)
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin_memory is None else pin_memory
        self.delivered = 0  # steps handed to the consumer
        self._source: Iterator[List[Batch]] = iter(source)
        self._stream = torch.cuda.Stream(device=self.device) if (self.cuda and depth > 0) else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._done = False
        if depth > 0:
            self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # -- producer ---------------------------------------------------------------------------------
    def _to_device(self, batches: List[Batch]):
        """The step's tensors on the device (copies issued on the side stream) and the copy's event."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
        out = []
        with ctx:
            for inputs, targets in batches:
                if self.pin:
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                out.append((inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)))
            event = None
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        return out, event

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                try:
                    batches = next(self._source)
                except StopIteration:
                    self._put(_END)
                    return
                if not self._put(self._to_device(batches)):
                    return
        except BaseException as exc:  # raised again in the consumer
            self._put(_Failure(exc))

    # -- consumer ---------------------------------------------------------------------------------
    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> List[Batch]:
        if self._done:
            raise StopIteration
        if self.depth == 0:
            try:
                batches = next(self._source)
            except StopIteration:
                self._done = True
                raise
            out, _ = self._to_device(batches)
            self.delivered += 1
            return out
        item = self._get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        out, event = item
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for pair in out:
                for t in pair:
                    t.record_stream(current)
        self.delivered += 1
        return out

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:  # it may have put its last item just before it ended
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the data prefetch thread ended without a result") from None

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the step it is building)."""
        self._stop.set()
        self._done = True
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a put on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def prefetch(source: Iterable[List[Batch]], device, depth: int) -> Prefetcher:
    """`Prefetcher(source, device, depth)`: depth 0 (data.prefetch=0) is the synchronous path."""
    return Prefetcher(source, device, depth)


class PrefetchedBatches:
    """`GlobalBatches.next()` with the batches built ahead (data.prefetch steps) and already on `device`.

        feed = PrefetchedBatches(train, device, cfg.data.prefetch)   # after the data position is restored
        batches = feed.next()                                        # instead of train.next()
        ...
        feed.close()

    The thread builds the batches at positions ahead of `train.consumed_samples` without touching it;
    `next()` advances `train.consumed_samples` by one global batch, as `train.next()` does, so the data
    position every checkpoint records (`train.state_dict()`) stays the consumer's. If the position was
    moved meanwhile (a load), the prefetcher restarts from the new one.
    """

    def __init__(self, train, device, depth: int):
        self.train, self.device, self.depth = train, device, depth
        self._pf: Optional[Prefetcher] = None
        self._next_sample = None

    def _start(self) -> None:
        if self._pf is not None:
            self._pf.close()
        first, gb = self.train.consumed_samples, self.train.global_batch

        def steps():
            s = first
            while True:
                yield self.train._batches(s)
                s += gb

        self._pf = Prefetcher(steps(), self.device, self.depth)
        self._next_sample = first

    def next(self) -> List[Batch]:
        if self._pf is None or self._next_sample != self.train.consumed_samples:
            self._start()
        batches = next(self._pf)
        self.train.consumed_samples += self.train.global_batch
        self._next_sample = self.train.consumed_samples
        return batches

    def close(self) -> None:
        if self._pf is not None:
            self._pf.close()
            self._pf = None
