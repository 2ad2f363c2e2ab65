"""The training loop: `python launch/pretrain.py --config FILE [--set key=value ...]`.

Reads top to bottom: discover the launcher -> init process groups -> data -> model (parallelism
applied from outside) -> DeepSpeed engine -> resume -> steps (log, evaluate, checkpoint) -> final
evaluation and checkpoint.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

from megams.config import Config, ConfigError, dump_config, load_config


@dataclass
class Layout:
    """Where this rank sits. With megams.parallel available, built from ParallelDims."""
    world: int
    rank: int
    dp: int
    dp_rank: int
    tp: int = 1
    pp: int = 1
    dims: object = None


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit code 2 through main(), not argparse's usage dump
        raise ConfigError(f"{message} (usage: pretrain.py --config FILE [--set KEY=VALUE ...])")


def parse_args(argv):
    p = _ArgumentParser(prog="pretrain.py", description="Pretrain a (multi-scale) transformer LM with megams.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.max_steps=10 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def _user_error_types():
    from megams.checkpoint.errors import CheckpointError
    from megams.data.errors import DataError
    return (ConfigError, DataError, CheckpointError)


class NonFiniteStop(RuntimeError):
    """The run stopped on a NaN/inf loss or gradient (exit code 4)."""


def main(argv=None) -> int:
    """Exit codes: megams.training.exit_codes (0 done, 2 bad input, 3 save failed, 4 NaN/inf,
    5 collective failure, 75 preempted)."""
    from megams.training import exit_codes
    from megams.training.checkpoint import CheckpointSaveError
    trainer = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(args.config, args.set)
        trainer = Trainer(cfg)
        return trainer.run()
    except _user_error_types() as e:
        return _fail(trainer, str(e), exit_codes.BAD_INPUT)
    except CheckpointSaveError as e:
        return _fail(trainer, f"checkpoint not saved at step {trainer.step}: {e}", exit_codes.SAVE_FAILED)
    except NonFiniteStop as e:
        return _fail(trainer, str(e), exit_codes.NONFINITE)
    except Exception as e:  # noqa: BLE001 - only a failed collective is handled here; the rest re-raises
        from megams.distributed.watchdog import describe_failure, is_comm_failure
        if trainer is None or not trainer.distributed_started or not is_comm_failure(e):
            raise
        msg = describe_failure(e, trainer.board, trainer.step, trainer.cfg.training.collective_timeout_s)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_codes.COMM_FAILURE)  # peers are gone or hung: tearing the process group down could hang


def _fail(trainer, message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if trainer is not None:
        trainer.shutdown()
    return code


def _forget_deepspeed_topology():
    """DeepSpeed keeps the last engine's mpu (a pipeline grid, a tensor-parallel mpu) in a global; a
    later engine in this process without one would pick it up."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups.mpu = None


def _shutdown():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            import deepspeed.comm
            if deepspeed.comm.is_initialized():  # also drops DeepSpeed's cached groups: a later run
                deepspeed.comm.destroy_process_group()  # in this process starts clean
            else:
                dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.owns_process_group = False
        self.distributed_started = False
        self.board = None  # megams.distributed.watchdog.ProgressBoard: who reached which step
        self.preempt = None
        self.comm_timing = None  # megams.training.comm_timing.StepCommTiming (logging.comm_timing)
        self.step = 0

    def shutdown(self) -> None:
        """End the process group we started (barrier first: gloo may abort at exit otherwise)."""
        if self.board is not None:
            self.board.stop_heartbeat()
        if self.preempt is not None:  # main() may run again in this process (tests, notebooks)
            self.preempt.uninstall()
            self.preempt = None
        if self.comm_timing is not None:
            self.comm_timing.close()
            self.comm_timing = None
        if self.owns_process_group:
            _shutdown()
        else:  # the caller's process group lives on; DeepSpeed's record of this run's topology must not
            _forget_deepspeed_topology()

    # -- set-up ---------------------------------------------------------------------------
    def _init_distributed(self) -> Layout:
        from megams.distributed.launch_env import apply_thread_hygiene, discover_and_export
        le = discover_and_export()
        threads = apply_thread_hygiene(le)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        warnings.filterwarnings("ignore", category=FutureWarning)
        import torch
        torch.set_num_threads(threads)
        if self.cfg.training.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but no CUDA device is available (use auto or cpu)")
        use_cuda = self.cfg.training.device != "cpu" and torch.cuda.is_available()
        backend = self.cfg.training.dist_backend
        backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        if backend == "nccl" and not use_cuda:
            raise ConfigError("training.dist_backend=nccl needs CUDA (training.device is cpu, or no GPU is visible)")
        self.device = _cuda_device(le.local_rank, torch.cuda.device_count(), backend) if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(self.device)  # before any CUDA state: the RNG tracker, NCCL, the model
        import deepspeed
        import torch.distributed as dist
        from datetime import timedelta

        from megams.distributed.watchdog import set_group_timeout
        self.owns_process_group = not dist.is_initialized()  # tests may start it for us
        timeout = timedelta(seconds=self.cfg.training.collective_timeout_s)
        set_group_timeout(timeout)  # the groups DeepSpeed and megams.parallel create later too
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timeout)
        self.distributed_started = True
        from megams.distributed.watchdog import ProgressBoard
        self.board = ProgressBoard.from_default_group()
        if self.board is not None and le.world_size > 1:
            self.board.start_heartbeat(min(10.0, max(1.0, self.cfg.training.collective_timeout_s / 10)))
        if le.rank == 0:
            print(le.describe() + f" threads/rank={threads} device={self.device}", flush=True)
        p = self.cfg.parallel
        if le.world_size % (p.tensor * p.pipeline):
            raise ConfigError(f"world size {le.world_size} is not divisible by parallel.tensor={p.tensor} x "
                              f"parallel.pipeline={p.pipeline}")
        if p.tensor > 1 or p.pipeline > 1:
            from megams.parallel.dims import build_parallel_dims
            dims = build_parallel_dims(self.cfg)
            return Layout(le.world_size, le.rank, dims.dp_size, dims.dp_rank, p.tensor, p.pipeline, dims)
        return Layout(le.world_size, le.rank, le.world_size, le.rank)

    def _build_data(self, layout: Layout):
        """Rank 0 tokenizes what is missing (cached); the other ranks wait for it on the rendezvous
        store, not in a collective: preparing a large corpus is not bounded by
        training.collective_timeout_s, and the waiting ranks say what rank 0 is doing."""
        from megams.data import build_data, check_vocab
        from megams.data.errors import DataError
        c = self.cfg
        bundle, err = None, None
        store = _default_store() if layout.world > 1 else None
        status_key, done_key = _data_keys()
        if layout.rank == 0:  # rank 0 tokenizes text sources into the cache first
            if store is not None:
                store.set(status_key, f"preparing {_describe_source(c.data)}")
            try:
                bundle = build_data(c.data, c.data.seq_len, c.training.seed, is_rank_zero=True,
                                    progress=c.logging.progress_bar)
            except DataError as e:
                err = e
            if store is not None:
                store.set(done_key, "error" if err else "ok")
            if err:
                raise err
        elif store is not None:
            if _wait_for_rank0(store, layout.rank, status_key, done_key) != "ok":
                raise DataError("data preparation failed on rank 0 (see its message)")
        if bundle is None:
            bundle = build_data(c.data, c.data.seq_len, c.training.seed, is_rank_zero=False)
        check_vocab(bundle.tokenizer, c.model.vocab_size)
        return bundle

    def _build_model(self, layout: Layout, mode: str):
        """This rank's part of the model only: built on the meta device, parallelism applied to the
        skeleton, then this rank's tensor slice of its pipeline stage materialised on the device
        (megams.parallel.build). Nothing of another stage or tensor rank is ever allocated."""
        from megams.parallel.build import build_local_model
        zero3 = None
        if self.cfg.parallel.zero_stage == 3:  # partitioned over the data ranks as each parameter is made
            from megams.training.engine import deepspeed_config
            zero3 = {"config": deepspeed_config(self.cfg, layout.dp, mode), "group": _dp_group(layout),
                     "mpu": layout.dims.mpu if layout.dims is not None else None}
        local = build_local_model(self.cfg, layout.dims, self.device, zero3=zero3)
        if self.cfg.training.compile:  # per block, after apply_tp / apply_ac, before the engine
            from megams.parallel.compile import apply_compile
            report = apply_compile(local.module, self.cfg)
            if layout.rank == 0:
                print(report.describe(), flush=True)
        return local.module, local.loss_fn

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        import torch
        from megams.data.batches import GlobalBatches
        from megams.models.cost import flops_per_token
        from megams.training import checkpoint as ckpt
        from megams.training.engine import build_engine, precision_mode
        from megams.training.metrics import MetricsLog, Progress
        from megams.training.mfu import peak_flops
        from megams.training.nonfinite import NonFiniteGuard

        c = self.cfg
        layout = self._init_distributed()
        is_main = layout.rank == 0
        mode = precision_mode(c, self.device)
        gas = c.grad_accum_steps(layout.dp)
        run_dir = os.path.abspath(c.training.run_dir)
        if is_main:
            os.makedirs(run_dir, exist_ok=True)
        data = self._build_data(layout)
        if layout.dims is not None:  # dropout: the same on tensor ranks, different on data ranks
            from megams.parallel.random import seed_parallel_rng
            seed_parallel_rng(c.training.seed, layout.dims)
        else:
            torch.manual_seed(c.training.seed + layout.dp_rank)
        model, loss_fn = self._build_model(layout, mode)
        guard = NonFiniteGuard(report_engine_skips=c.training.precision != "fp16")
        loss_fn = guard.watch_loss(loss_fn)
        plain_names = {id(p): n for n, p in model.named_parameters()}  # pipeline stages rename parameters
        n_params = _param_count(model, layout)
        self.pipeline = None
        if layout.pp > 1:  # the model cut into stages, trained by engine.train_batch (1F1B)
            from megams.training.pipeline_step import PipelineTraining
            self.pipeline = PipelineTraining(c, layout)
            engine, scheduler = self.pipeline.build_engine(model, loss_fn, mode, guard=guard)
            del model  # the other stages' layers can be freed
        else:
            engine, _, scheduler = build_engine(c, model, layout.dp, mode, mpu=getattr(layout.dims, "mpu", None),
                                                guard=guard)
        from megams.checkpoint.reshard import describe_layout, start_from
        recorded = describe_layout(engine, c, layout, plain_names)  # how parameters are split: megams.json
        train = GlobalBatches(data.train, c.data.seq_len, c.training.global_batch_size, c.training.micro_batch_size,
                              layout.dp_rank, layout.dp)

        step = 0
        skips = {"total": 0, "consecutive": 0}  # steps skipped on a NaN/inf (training.on_nonfinite=skip)
        metrics = MetricsLog(run_dir, enabled=is_main, tensorboard=c.logging.tensorboard)
        latest = ckpt.latest_checkpoint(run_dir) if c.checkpoint.resume else None
        if latest:
            from megams.checkpoint.reshard import check_resume
            check_resume(ckpt.read_meta(latest), c, layout, latest)  # same model and layout, or a clear error
            meta = ckpt.load(engine, latest, checksums=c.checkpoint.verify == "checksum")
            step = meta["step"]
            train.load_state_dict(meta["data"])
            skips.update(meta.get("nonfinite_skips", {}))
            if is_main:
                print(f"[megams] resumed from {latest} at step {step}", flush=True)
        elif c.checkpoint.load_from:  # another layout, or a plain-torch directory (megams.checkpoint.reshard)
            step, data_state = start_from(engine, scheduler, c, layout, recorded, c.checkpoint.load_from,
                                          log=lambda m: is_main and print(m, flush=True))
            if data_state:
                train.load_state_dict(data_state)
        if train.consumed_samples == 0 and step > 0:  # checkpoints that did not record the data position
            train.consumed_samples = step * c.training.global_batch_size
        self.step = step
        metrics.truncate_after(step)  # records past the starting step (a killed run's) are about to be redone
        if is_main:  # only once the run is accepted: a refused start leaves the run directory as it was
            _write_config(run_dir, c)
        if step >= c.training.max_steps:
            if is_main:
                print(f"[megams] run already at training.max_steps={c.training.max_steps}; checkpoint: {latest}")
            self.shutdown()
            return 0

        autocast = (torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
                    if mode == "autocast_bf16" else nullcontext())
        tokens_per_step = c.training.global_batch_size * c.data.seq_len
        flops_tok = flops_per_token(c.model, c.data.seq_len)
        peak = peak_flops(c.training.precision, self.device)
        progress = Progress(c.training.max_steps, step, enabled=is_main and c.logging.progress_bar)
        preempt = self.preempt = _preemption_handler()
        if is_main:
            progress.write(f"[megams] {c.model.type}: {n_params:,} params, "
                           f"dp={layout.dp} tp={layout.tp} pp={layout.pp} zero={c.parallel.zero_stage} "
                           f"precision={mode} grad_accum={gas} run_dir={run_dir}")

        def meta_for(s, data_state=None):
            state = data_state or train.state_dict()
            return {"step": s, "data": state, "consumed_tokens": state["consumed_samples"] * c.data.seq_len, "nonfinite_skips": dict(skips),
                    "config": dump_config(c),
                    "layout": {"world": layout.world, "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
                               "zero_stage": c.parallel.zero_stage, "precision": c.training.precision},
                    "tokenizer": data.tokenizer.fingerprint, "parameters": recorded}

        size_estimate = _checkpoint_estimate(n_params, mode)

        def save(s, meta, **kw):
            return ckpt.save(engine, run_dir, s, meta, c.checkpoint.keep_last, size_estimate=size_estimate, **kw)

        last_ckpt = latest
        own_norm = c.parallel.zero_stage == 0 and mode in ("fp32", "autocast_bf16") and self.pipeline is None
        gnorm, last_loss = None, None
        engine.train()
        if c.logging.comm_timing:
            from megams.training.comm_timing import StepCommTiming
            self.comm_timing = StepCommTiming()
        timing = self.comm_timing
        while step < c.training.max_steps:
            if timing is not None:
                timing.start_step()
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            batches = train.next()
            log_now = (step + 1) % c.logging.interval == 0 or step + 1 == c.training.max_steps
            if self.pipeline is not None:
                loss_val = self.pipeline.train_step(engine, batches, autocast, self.device)
            else:
                loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)  # on the device: no sync per micro-batch
                for inputs, targets in batches:
                    inputs = inputs.to(self.device, non_blocking=True)
                    targets = targets.to(self.device, non_blocking=True)
                    with autocast:
                        logits = engine(inputs)
                    loss = loss_fn(logits, targets)
                    engine.backward(loss)
                    if own_norm and engine.is_gradient_accumulation_boundary():
                        gnorm = _grad_norm(engine)  # DeepSpeed's ZeRO-0 fp32 path does not report it
                    engine.step()
                    loss_sum += loss.detach().float()
                loss_val = None
            step += 1
            self.step = step
            event = guard.pop(engine)  # every rank, every step (its own collective)
            if self.pipeline is None and (log_now or event):  # one host sync per logged step
                loss_val = _dp_mean(loss_sum / gas, layout)  # mean over the global batch
            dt = time.perf_counter() - t0
            if not own_norm:
                gnorm = engine.get_global_grad_norm()
            gnorm = float(gnorm) if gnorm is not None and (log_now or event) else None
            timed = None
            if timing is not None and (log_now or event):  # every rank: the gather is a collective
                from megams.training.comm_timing import gather_ranks
                timed = timing.end_step()
                timed["ranks"] = gather_ranks({"comm_s": timed["comm_s"], "step_time_s": dt,
                                               "peak_mem_bytes": _peak_mem(self.device), "comm_ops": timed["comm_ops"]})
            skips["consecutive"] = skips["consecutive"] + 1 if event else 0
            skips["total"] += bool(event)
            if is_main and (event or step % c.logging.interval == 0 or step == c.training.max_steps):
                tps = tokens_per_step / dt
                achieved = flops_tok * tps / layout.world
                rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                       "tokens_per_s": tps, "tflops": achieved / 1e12, "mfu": achieved / peak,
                       "peak_mem_bytes": _peak_mem(self.device), "step_time_s": dt,
                       "consumed_tokens": train.consumed_samples * c.data.seq_len, "skipped_steps": skips["total"]}
                if event:
                    rec.update(skipped=True, nonfinite=event.describe())
                if timed is not None:  # this rank's collectives; then every rank's, in rank order
                    rec.update(timed)
                metrics.write(rec)
            if event:
                self._on_nonfinite(event, step, skips, save, meta_for, train, progress, is_main)
            if self.board is not None:
                self.board.report(step)
            last_loss = loss_val if loss_val is not None else last_loss
            progress.update(loss=last_loss, lr=lr)
            last = step == c.training.max_steps
            if (c.training.eval_interval and step % c.training.eval_interval == 0) or last:
                self._evaluate(engine, data, loss_fn, layout, autocast, step, metrics, progress)
            stop = preempt.stop_requested() if preempt else False
            exit_now = bool(c.training.exit_interval) and step % c.training.exit_interval == 0 and not last
            if last or stop or exit_now or (c.checkpoint.interval and step % c.checkpoint.interval == 0):
                last_ckpt = save(step, meta_for(step))
            if exit_now:
                if is_main:
                    progress.write(f"[megams] training.exit_interval: stopped at step {step}, checkpoint {last_ckpt}")
                progress.close()
                self.shutdown()
                return 0
            if stop:
                if is_main:
                    progress.write(f"[megams] preemption signal: stopped at step {step}, checkpoint {last_ckpt}")
                progress.close()
                metrics.close()
                preempt.requeue()
                self.shutdown()
                from megams.training.exit_codes import PREEMPTED
                return PREEMPTED
        progress.close()
        metrics.close()
        if is_main:
            print(f"[megams] done: step {step}, val_loss {self.last_eval['val_loss']:.4f}, "
                  f"val_ppl {self.last_eval['val_ppl']:.3f}, val_bpb {_fmt_bpb(self.last_eval['val_bpb'])}", flush=True)
            print(f"[megams] checkpoint: {last_ckpt}", flush=True)
        self.shutdown()
        return 0

    def _on_nonfinite(self, event, step, skips, save, meta_for, train, progress, is_main) -> None:
        """A skipped step: carry on (on_nonfinite=skip, under the consecutive limit), or save the last
        good state (the weights before this step, the data position before its batch) and stop."""
        c = self.cfg.training
        what = f"{event.describe()} at step {step}"
        if c.on_nonfinite == "skip" and skips["consecutive"] < c.max_consecutive_nonfinite:
            if is_main:
                progress.write(f"[megams] {what}: update skipped ({skips['consecutive']} in a row, "
                               f"{skips['total']} in total; limit training.max_consecutive_nonfinite="
                               f"{c.max_consecutive_nonfinite})")
            return
        why = ("training.on_nonfinite=stop" if c.on_nonfinite == "stop" else
               f"{skips['consecutive']} steps in a row skipped (training.max_consecutive_nonfinite="
               f"{c.max_consecutive_nonfinite})")
        data_state = dict(train.state_dict(), consumed_samples=train.consumed_samples - c.global_batch_size)
        meta = dict(meta_for(step - 1, data_state), stopped_at_step=step, nonfinite=event.describe())
        path = save(step - 1, meta, tag=f"nonfinite_step_{step:08d}", make_latest=False)
        progress.close()
        raise NonFiniteStop(f"{what} ({why}): stopped; the last good state (after step {step - 1}) is saved in "
                            f"{path}")

    def _evaluate(self, engine, data, loss_fn, layout, autocast, step, metrics, progress):
        import torch
        from megams.data.batches import eval_batches
        c = self.cfg
        from megams.distributed.comm import all_reduce, comm_zeros, to_comm
        engine.eval()
        ev = eval_batches(data.valid, c.training.eval_batches, c.training.global_batch_size,
                          layout.dp_rank, layout.dp)  # global batch size: the same tokens for any layout
        batches, bytes_per_token = ev.batches, ev.bytes_per_token
        if self.pipeline is not None:  # already averaged over the data ranks (equal-sized batches)
            val_loss = self.pipeline.evaluate(engine, batches, autocast, self.device)
        else:  # in micro-batches: never more than one micro-batch of (vocab-wide) logits alive
            group = _dp_group(layout)
            total = comm_zeros(2, dtype=torch.float64, group=group)
            mb = c.training.micro_batch_size
            with torch.no_grad():
                for inputs, targets in batches:
                    for i in range(0, inputs.shape[0], mb):
                        x = inputs[i:i + mb].to(self.device, non_blocking=True)
                        y = targets[i:i + mb].to(self.device, non_blocking=True)
                        with autocast:
                            logits = engine(x)
                        loss = loss_fn(logits, y)
                        del logits
                        total[0] += to_comm(loss.detach().double(), group) * y.numel()
                        total[1] += y.numel()
            all_reduce(total, group=group)
            val_loss = (total[0] / total[1]).item()
        engine.train()
        rec = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
               "val_bpb": val_loss / math.log(2) / bytes_per_token if bytes_per_token else None}
        self.last_eval = rec
        metrics.write(rec)
        if layout.rank == 0:
            progress.write(f"[megams] step {step}: val_loss {val_loss:.4f} val_ppl {rec['val_ppl']:.3f} "
                           f"val_bpb {_fmt_bpb(rec['val_bpb'])}")


_DATA_KEYS = {"count": 0}  # runs in one process group (tests, notebooks) each get their own store keys


def _data_keys():
    _DATA_KEYS["count"] += 1
    n = _DATA_KEYS["count"]
    return f"megams/data/{n}/status", f"megams/data/{n}/done"


def _default_store():
    from torch.distributed import distributed_c10d as c10d
    return c10d._get_default_store()


def _describe_source(data_cfg) -> str:
    """What rank 0 is preparing, for the waiting ranks' message."""
    paths = [b.path for b in data_cfg.blend] if data_cfg.blend else [data_cfg.path]
    out = []
    for p in paths:
        if p is None:
            out.append("the built-in corpus")
            continue
        size = next((os.path.getsize(f) for f in (p, p + ".bin") if os.path.isfile(f)), None)
        out.append(f"{p} ({size / 2**20:.1f} MB)" if size is not None else str(p))
    return "data: " + ", ".join(out)


def _wait_for_rank0(store, rank: int, status_key: str, done_key: str, poll_s: float = 0.2) -> str:
    """Poll the store until rank 0 says its data is ready ("ok" or "error"); the heartbeat thread keeps
    this rank alive on the progress board meanwhile. Rank 1 says every `say_every_s` what rank 0 does."""
    say_every_s = float(os.environ.get("MEGAMS_DATA_WAIT_SAY_S", "30"))
    t0 = last = time.monotonic()
    while not store.check([done_key]):
        time.sleep(poll_s)
        now = time.monotonic()
        if rank == 1 and now - last >= say_every_s:
            last = now
            doing = store.get(status_key).decode() if store.check([status_key]) else "starting"
            print(f"[megams] ranks 1..: waiting {now - t0:.0f} s for rank 0, which is {doing} "
                  f"(tokenized once into data.cache_dir; not bounded by training.collective_timeout_s)", flush=True)
    return store.get(done_key).decode()


def _cuda_device(local_rank: int, count: int, backend: str) -> str:
    """This rank's GPU: `cuda:<local_rank>`, checked against the visible devices. With gloo several
    ranks may share a device (r mod count); NCCL refuses two ranks on one device."""
    if count == 0:
        raise ConfigError("training.device: CUDA reports no device (check CUDA_VISIBLE_DEVICES)")
    if local_rank < count:
        return f"cuda:{local_rank}"
    if backend == "gloo":
        return f"cuda:{local_rank % count}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(f"local rank {local_rank} has no GPU of its own: {count} CUDA device(s) visible"
                      + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                      + f"; start at most {count} ranks per node (deepspeed --num_gpus {count}), or set "
                      "training.dist_backend=gloo to share devices")


def _dp_group(layout):
    return layout.dims.dp_group if layout.dims is not None else None


def _dp_mean(local, layout) -> float:
    """Mean over data-parallel ranks (tensor/pipeline peers hold the same value). One host sync."""
    from megams.distributed.comm import all_reduce, to_comm
    group = _dp_group(layout)
    t = to_comm(local.detach().double(), group).clone()
    all_reduce(t, group=group)
    return (t / layout.dp).item()


def _fmt_bpb(bpb) -> str:
    return f"{bpb:.4f}" if bpb is not None else "unavailable (the dataset stores no source bytes)"


def _grad_norm(engine) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients, before clipping; tensor-
    replicated parameters count once (the mpu tells DeepSpeed's helper which ones are)."""
    from deepspeed.runtime.utils import clip_grad_norm_
    return float(clip_grad_norm_([p for p in engine.module.parameters() if p.grad is not None],
                                 max_norm=float("inf"), mpu=engine.mpu))


def _param_count(model, layout) -> int:
    """Parameters of the whole (plain) model, however it is split."""
    if layout.tp > 1:
        from megams.parallel.tensor_parallel import parameter_count
        return parameter_count(model)
    from megams.parallel.layers import param_shape
    return sum(math.prod(param_shape(p)) for p in model.parameters())


def _checkpoint_estimate(n_params: int, mode: str) -> int:
    """Bytes of a first checkpoint, before one exists to measure: fp32 weights + AdamW's two
    moments (+ bf16 weights next to the fp32 master)."""
    per_param = 12 + (2 if mode == "ds_bf16" else 0)
    return n_params * per_param


def _peak_mem(device: str) -> int:
    import torch
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _preemption_handler():
    try:
        from megams.training.preemption import PreemptionHandler
    except ImportError:
        return None
    h = PreemptionHandler()
    h.install()
    return h


def _write_config(run_dir: str, cfg: Config) -> None:
    import yaml
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(dump_config(cfg), f, sort_keys=False)
    os.replace(tmp, path)
