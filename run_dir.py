"""
out_dir holds one run: a lock while it runs, files that are whole or absent (written to a
temporary, then renamed), and the checkpoints a resumed run continues from bit for bit.
"""
import atexit
import json
import os
import tempfile
from types import SimpleNamespace

import torch

import cli
import models
import parallel
from parallel import RANK

_lock = None  # the open lock file of this process: the lock lasts as long as it does

def _try_lock(f):
    """An exclusive lock on an open file, released by the kernel when the process ends however it
    ends (so a crashed run never leaves a lock that holds). False if another process has it."""
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False

def _lock_error(out_dir, f):
    f.seek(0)
    holder = f.read().strip() or "(unknown)"
    cli.die(f"--out_dir={out_dir!r} is in use by the run of process {holder} (its lock: {os.path.join(out_dir, 'lock')}); "
        f"wait for it to finish or use another --out_dir")

def check_not_locked(out_dir):
    """Fail early, before loading anything, when a live run holds out_dir; writes nothing."""
    path = os.path.join(out_dir, "lock")
    if os.path.isfile(path):
        with open(path, "r+") as f:
            if not _try_lock(f):
                _lock_error(out_dir, f)

def take_out_dir(out_dir):
    """Create out_dir and take its lock (rank 0) before anything is written in it. The lock file
    holds the process id of the run; a run that ended without emptying it (killed, crashed) is
    named when the next run takes the folder over."""
    global _lock
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        cli.die(f"--out_dir={out_dir!r} is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a real write: root passes access checks on a read-only mount
            pass
    except OSError as e:
        cli.die(f"--out_dir={out_dir!r} cannot be created or written: {e.strerror}")
    if RANK != 0:
        return
    f = open(os.path.join(out_dir, "lock"), "a+")
    if not _try_lock(f):
        _lock_error(out_dir, f)
    f.seek(0)
    old = f.read().strip()
    if old:
        print(f"note: {out_dir}/lock: the run of process {old} ended without releasing it (killed?); taking it over")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _lock = f
    atexit.register(release_out_dir)

def release_out_dir():
    global _lock
    if _lock is not None:
        _lock.seek(0)
        _lock.truncate()  # empty: the run ended; the kernel drops the lock itself with the file
        _lock.close()
        _lock = None

def write_atomic(path, data, mode="w"):
    """Write to a temporary file, flush it to disk, then rename: a reader (or a resumed run after a
    crash) sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        f.write(data) if isinstance(data, (str, bytes)) else torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")

def load_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain containers, no pickled code), and a
    clear error for a missing, truncated or corrupt file. Memory-mapped: the processes of a node
    share one copy of the file in memory, and each takes what it needs from it."""
    if not os.path.exists(path):
        cli.die(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a pickle that is not ours, ...: all mean the same here
        cli.die(f"{path}: the checkpoint is truncated or corrupt ({type(e).__name__}); delete it to start over")

def checkpoint_path(cfg, stage):
    """out_dir/ckpt.pt; a method distilled beside the other (--workers=2) keeps its own, ckpt-<method>.pt."""
    side_by_side = getattr(cfg, "workers", 1) == 2 and stage in ("opd", "caopd")
    return os.path.join(cfg.out_dir, f"ckpt-{stage}.pt" if side_by_side else "ckpt.pt")

def save_checkpoint(cfg, tok, stage, step, model, teacher, opt, rng, bad, skipped, quiet=False):
    """checkpoint_path: everything a resumed run needs to continue bit for bit, whole (under FSDP2
    every process takes part in gathering the shards; rank 0 writes). A Hugging Face model is also
    exported, whole, to out_dir/hf."""
    state = {"model": parallel.full_state(model), "teacher": None if teacher is None else parallel.full_state(teacher),
             "optimizer": parallel.full_optimizer_state(model, opt)}
    if RANK != 0:
        return
    path = checkpoint_path(cfg, stage)
    write_atomic(path, {
        "stage": stage, "step": step, "config": vars(cfg), **state,
        "rng": {"python": rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "bad_steps": bad, "skipped": skipped}, "wb")
    if cfg.init_from != "scratch":
        models.export_hf(model, tok, os.path.join(cfg.out_dir, "hf"), cfg.export_dtype, state["model"])
    if not quiet:
        from tqdm import tqdm
        tqdm.write(f"checkpoint: {stage} step {step} -> {path}")

def restore(ck, model, teacher, opt, rng):
    """The state save_checkpoint wrote, back in place. Returns (step, bad steps in a row, skipped)."""
    parallel.load_full_state(model, ck["model"])
    if teacher is not None:
        parallel.load_full_state(teacher, ck["teacher"])
    parallel.load_optimizer_state(model, opt, ck["optimizer"])
    rng.setstate(ck["rng"]["python"])
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["bad_steps"], ck["skipped"]

def save_student(cfg, tok, method, model, skipped, seconds, last):
    """A distilled student, whole (gathered under FSDP2: every process takes part), to
    out_dir/<method>.pt; a Hugging Face one also to out_dir/hf (the last method's) or hf-<method>."""
    state = parallel.full_state(model)
    if RANK != 0:
        return
    write_atomic(os.path.join(cfg.out_dir, f"{method}.pt"),
                 {"model": state, "config": vars(cfg), "skipped": skipped, "seconds": seconds}, "wb")
    if cfg.init_from != "scratch":
        models.export_hf(model, tok, os.path.join(cfg.out_dir, "hf" if last else f"hf-{method}"),
                         cfg.export_dtype, state)

def load_student(cfg, method, model):
    """The student save_student wrote, into model. Returns (skipped updates, seconds it took)."""
    result = load_checkpoint(os.path.join(cfg.out_dir, f"{method}.pt"))
    parallel.load_full_state(model, result["model"])
    return result["skipped"], result.get("seconds", 0.0)

# -----------------------------------------------------------------------------
# resume: the interrupted command + --init_from=resume

RESUME_FREE = ("init_from", "out_dir", "device", "threads", "log_every", "eval_every",
               "wandb_project")  # change no number

def resume_settings(given, SETTINGS):
    """--init_from=resume: the checkpoint's settings and the checkpoint. SETTINGS: train_small's. The rest of the command line
    may repeat the run's own settings (the command that was interrupted, with --init_from=resume
    added); one that differs is an error naming it. RESUME_FREE may change."""
    path = os.path.join(given.get("out_dir", SETTINGS["out_dir"][0]), "ckpt.pt")
    ck = load_checkpoint(path)
    differ = [f"--{k}={v!r} (the run has {ck['config'].get(k)!r})" for k, v in given.items()
              if k not in RESUME_FREE and ck["config"].get(k) != v]
    if differ:
        cli.die(f"--init_from=resume continues the run in {path} with its own settings, and these differ: "
                   f"{', '.join(differ)}; drop them, or start a new run in another --out_dir")
    # a checkpoint of older code: its settings
    saved = {k: v for k, v in ck["config"].items() if k in SETTINGS}
    missing, dropped = sorted(set(SETTINGS) - set(saved)), sorted(set(ck["config"]) - set(SETTINGS))
    if missing or dropped:
        print(f"note: {path} was written by another version: {', '.join(missing) or 'no setting'} take their "
              f"defaults, {', '.join(dropped) or 'none'} no longer exist")
    cfg = SimpleNamespace(**{**{k: v[0] for k, v in SETTINGS.items()}, **saved,
                             **{k: v for k, v in given.items() if k in RESUME_FREE[1:]}})
    cli.check_settings(cfg)
    return cfg, ck

def resume_plan(cfg, ck, methods, base_cache):
    """Where a run goes on from: ck, the checkpoint of an interrupted run (None: a new run). Returns
    a namespace: at (the index of the first stage not finished among base + methods), side_by_side
    (ck is of a side-by-side stage 1), checkpoint(method) (the one it continues from, or None),
    finished(method) and resumed ({stage: the step it goes on from}; None for a new run: which of
    the interrupted run's metrics.jsonl lines stay, metrics_log.kept_lines)."""
    stages = (["base"] if cfg.base_steps else []) + methods
    side = bool(ck) and ck["stage"] == "side by side"
    # stages before ck's are finished; it continues from ck ("side by side": both methods from their own)
    at = -1 if not ck else stages.index(methods[0] if side else ck["stage"])

    def checkpoint(m):
        if side and os.path.exists(checkpoint_path(cfg, m)):
            return load_checkpoint(checkpoint_path(cfg, m))
        return ck if ck and ck["stage"] == m else None
    resumed = None
    if ck:
        resumed = {ck["stage"]: ck["step"]}
        if ck["stage"] == "base" and os.path.exists(base_cache):
            resumed = {methods[0]: 0}  # stage 0 ended after its last checkpoint: its base is reused
        if side:  # each method from its own checkpoint, if it wrote one
            resumed = {m: load_checkpoint(checkpoint_path(cfg, m))["step"]
                       if os.path.exists(checkpoint_path(cfg, m)) else 0 for m in methods}
    if ck and RANK == 0:
        print(f"resuming {ck['stage']} at step {ck['step']} from {cfg.out_dir}/ckpt.pt")
    return SimpleNamespace(
        at=at, side_by_side=side, checkpoint=checkpoint, resumed=resumed, finished=lambda m: stages.index(m) < at)
