"""
out_dir holds one run: a lock while it runs, files that are whole or absent (written to a
temporary, then renamed), and the checkpoints a resumed run continues from bit for bit.

A run has an identity, RUN: a random id and a fingerprint of the settings that change its numbers.
out_dir/run.json names it (with the settings as given and as resolved); every file the run writes
carries it (checkpoints, <method>.pt, metrics.jsonl's first line, exports), and every file a run
reads must carry it and hold what the settings make (names, shapes, dtypes), checked before
anything is written. So a resume continues its own run or stops with one line, and a new run
never mixes with another's files: it moves them aside whole, to out_dir/previous-<id>/.
"""
import atexit
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from types import SimpleNamespace

import torch

import cli
import models
import parallel
from parallel import RANK

RUN = None  # this run's identity, {"id", "settings"}: set by identify()
# settings that change no number: a resume may change them; the fingerprint leaves them out
NUMBERLESS = ("out_dir", "log_every", "eval_every", "ckpt_every", "max_bad_steps", "wandb_project")
# a run's files in out_dir, in the order move_aside moves them (run.json last); base-*.pt (keyed by
# their settings), the lock and wandb/ serve every run
RUN_FILES = ("ckpt.pt", "ckpt-opd.pt", "ckpt-caopd.pt", "opd.pt", "caopd.pt", "metrics.jsonl", "results.json",
             "completions.jsonl", "reliability.png", "curves.png", "hf", "hf-opd", "hf-caopd", "run.json")

# -----------------------------------------------------------------------------
# the lock: one live run per out_dir

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

def _holder(f):
    """What a lock file says (a process id), whatever bytes it holds."""
    f.seek(0)
    return f.read(64).decode("utf-8", "replace").strip()

def _open_lock(out_dir, mode):
    path = os.path.join(out_dir, "lock")
    if os.path.lexists(path) and not os.path.isfile(path):
        cli.die(f"{path} is not a file (a folder?), so no run can lock --out_dir={out_dir!r}: remove it")
    try:
        return open(path, mode)
    except OSError as e:
        cli.die(f"--out_dir={out_dir!r}: its lock {path} cannot be opened ({e.strerror})")

def _lock_error(out_dir, f):
    cli.die(f"--out_dir={out_dir!r} is in use by the run of process {_holder(f) or '(unknown)'} (its lock: "
            f"{os.path.join(out_dir, 'lock')}); wait for it to finish or use another --out_dir")

def check_not_locked(out_dir):
    """Fail early, before loading anything, when a live run holds out_dir; writes nothing."""
    if os.path.lexists(os.path.join(out_dir, "lock")):
        with _open_lock(out_dir, "rb") as f:  # flock needs no write access
            if not _try_lock(f):
                _lock_error(out_dir, f)

def check_writable(out_dir):
    """Create out_dir if need be and check that files can be written in it. Returns whether it
    was created (an error before the run writes anything then removes it again)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        cli.die(f"--out_dir={out_dir!r} is a file, not a directory")
    made = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a real write: root passes access checks on a read-only mount
            pass
    except OSError as e:
        cli.die(f"--out_dir={out_dir!r} cannot be created or written: {e.strerror}")
    return made

def take_out_dir(out_dir):
    """Create out_dir and take its lock (rank 0) before anything is written in it. The lock file
    holds the process id of the run; a run that ended without emptying it (killed, crashed) is
    named when the next run takes the folder over. Then the temporaries a killed run left are
    cleaned (clean_leftovers)."""
    global _lock
    check_writable(out_dir)
    if RANK != 0:
        return
    f = _open_lock(out_dir, "a+b")
    if not _try_lock(f):
        _lock_error(out_dir, f)
    old = _holder(f)
    if old:
        print(f"note: {out_dir}/lock: the run of process {old} ended without releasing it (killed?); taking it over")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
    except OSError as e:
        cli.die(f"--out_dir={out_dir!r}: its lock cannot be written ({e.strerror})")
    _lock = f
    atexit.register(release_out_dir)
    clean_leftovers(out_dir)
    cli.stop_at("lock")

def release_out_dir():
    global _lock
    if _lock is not None:
        _lock.seek(0)
        _lock.truncate()  # empty: the run ended; the kernel drops the lock itself with the file
        _lock.close()
        _lock = None

def clean_leftovers(out_dir):
    """What a kill in the middle of a write leaves, made whole (the lock holder's alone): a
    temporary file or folder is removed; an export caught between its swaps is put back (hf.old
    is hf's last whole version when hf is missing)."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.endswith((".tmp", ".tmp.png")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif name.endswith(".old") and os.path.isdir(path):
            whole = path[:-len(".old")]
            if os.path.exists(whole):
                shutil.rmtree(path)
            else:
                os.replace(path, whole)

# -----------------------------------------------------------------------------
# files whole or absent

class _Recording:
    """A file's writes, and the OSError of the one that failed: torch.save reports a full disk
    as a RuntimeError of its own that does not say so."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()

def write_atomic(path, data, mode="w"):
    """Write to a temporary file, flush it to disk, then rename: a reader (or a resumed run after a
    crash) sees the old file or the new one, never half of one. A write that fails (a full disk)
    is one line, and its temporary is removed."""
    tmp, f = path + ".tmp", None
    try:
        with open(tmp, mode) as raw:
            f = _Recording(raw)
            f.write(data) if isinstance(data, (str, bytes)) else torch.save(data, f)
            f.flush()
            os.fsync(raw.fileno())
        cli.stop_at(f"write {os.path.basename(path)}")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        cli.cannot_write(path, (f and f.error) or e)

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")

def load_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain containers, no pickled code), and a
    clear error for a missing, truncated or corrupt file. Memory-mapped: the processes of a node
    share one copy of the file in memory, and each takes what it needs from it. What it holds is
    checked by check_file."""
    if not os.path.exists(path):
        cli.die(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated zip, a pickle that is not ours, ...: all mean the same here
        cli.die(f"{path}: the checkpoint is truncated or corrupt ({type(e).__name__}); delete it to start over")

def _state_problem(state, like, name, dtypes=True):
    """What is wrong with a state dict against `like` (the settings' model's), in words; None if nothing."""
    if not isinstance(state, dict):
        return f"its {name} is a {type(state).__name__}, not a state dict"
    missing = sorted(map(str, like.keys() - state.keys()))
    extra = sorted(map(str, state.keys() - like.keys()))
    if missing or extra:
        return f"its {name} " + (f"lacks {', '.join(missing[:3])}" if missing else
                                 f"has unknown {', '.join(extra[:3])}")
    for k, t in like.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            return f"its {name}'s {k} is a {type(v).__name__}, not a tensor"
        if v.shape != t.shape:
            return f"its {name}'s {k} is {tuple(v.shape)}, the settings make {tuple(t.shape)}"
        if v.dtype != t.dtype and (dtypes or not (v.is_floating_point() and t.is_floating_point())):
            return f"its {name}'s {k} is {v.dtype}, not {t.dtype}"
    return None

def _optimizer_problem(opt, model):
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)):
        return "its optimizer is not an optimizer's state"
    params, named = list(model.parameters()), dict(model.named_parameters())
    for k, s in opt["state"].items():  # by index (one process), by name (FSDP2's gathered state)
        p = named.get(k) if isinstance(k, str) else \
            params[k] if isinstance(k, int) and 0 <= k < len(params) else None
        if p is None or not isinstance(s, dict):
            return f"its optimizer has state for {k!r}, which is no parameter of the settings' model"
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                return f"its optimizer's state for {k!r} is {tuple(v.shape)}, the parameter {tuple(p.shape)}"
    return None

def check_file(path, obj, keys, model=None, run=True, then="run without --init_from=resume to start over"):
    """obj, read from path, is what this run wrote there: a dict with `keys`, carrying RUN (run=True),
    and where model (the settings' model) is given, its "model" (and "teacher", "optimizer") have
    the model's names, shapes and dtypes. Anything else is one line naming the file and what is
    wrong, and `then`, what to do. Returns obj."""
    def problem():
        if not isinstance(obj, dict):
            return f"holds a {type(obj).__name__}, not a dict"
        missing = [k for k in keys if k not in obj]
        if missing:
            return f"has no {', '.join(map(repr, missing))}"
        if run and obj["run"] != RUN:
            theirs = obj["run"].get("id") if isinstance(obj["run"], dict) else None
            return f"written by run {theirs}, not by run {RUN['id']} (this out_dir's run.json)"
        for k in ("step", "skipped", "bad_steps"):
            if k in keys and (type(obj[k]) is not int or obj[k] < 0):
                return f"its {k} is {obj[k]!r}, not a count"
        if model is None:
            return None
        like = model.state_dict()
        return (_state_problem(obj["model"], like, "model")
                or ("teacher" in keys and obj["teacher"] is not None
                    and _state_problem(obj["teacher"], like, "teacher", dtypes=False))
                or ("optimizer" in keys and _optimizer_problem(obj["optimizer"], model))
                or ("rng" in keys and _rng_problem(obj["rng"])))
    why = problem()
    if why:
        cli.die(f"{path}: {why}; {then}")
    return obj

def _rng_problem(rng):
    ok = (isinstance(rng, dict) and isinstance(rng.get("python"), tuple) and len(rng["python"]) == 3
          and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
          and isinstance(rng.get("cuda"), list))
    return None if ok else "its random states are not random states"

# -----------------------------------------------------------------------------
# checkpoints and students

CHECKPOINT = ("stage", "step", "config", "run", "model", "teacher", "optimizer", "rng", "bad_steps",
              "skipped")
STUDENT = ("model", "config", "run", "skipped", "seconds")

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
        "stage": stage, "step": step, "config": vars(cfg), "run": RUN, **state,
        "rng": {"python": rng.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "bad_steps": bad, "skipped": skipped}, "wb")
    if cfg.init_from != "scratch":
        models.export_hf(model, tok, os.path.join(cfg.out_dir, "hf"), cfg.export_dtype, state["model"], RUN)
    if not quiet:
        from tqdm import tqdm
        tqdm.write(f"checkpoint: {stage} step {step} -> {path}")
    cli.stop_at(f"checkpoint {stage} {step}")

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
                 {"model": state, "config": vars(cfg), "run": RUN, "skipped": skipped, "seconds": seconds},
                 "wb")
    if cfg.init_from != "scratch":
        models.export_hf(model, tok, os.path.join(cfg.out_dir, "hf" if last else f"hf-{method}"),
                         cfg.export_dtype, state, RUN)

def read_student(cfg, method, model):
    """out_dir/<method>.pt as save_student wrote it, checked (check_file)."""
    path = os.path.join(cfg.out_dir, f"{method}.pt")
    return check_file(path, load_checkpoint(path), STUDENT, model)

def load_student(cfg, method, model, result=None):
    """The student save_student wrote (result: it, already read), into model. Returns (skipped
    updates, seconds it took)."""
    result = result or read_student(cfg, method, model)
    parallel.load_full_state(model, result["model"])
    return result["skipped"], result["seconds"]

# -----------------------------------------------------------------------------
# the run's identity, and where a resume goes on from

def fingerprint(resolved):
    """The settings that change the numbers, hashed: the device by its kind (each process of a
    run has its own GPU)."""
    numbers = {k: torch.device(v).type if k == "device" else v for k, v in resolved.items()
               if k not in NUMBERLESS}
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:12]

def identify(cfg, ran=None):
    """Set RUN, this run's identity, once cfg is resolved: a new id (ran None), or the id of the
    run that resumes (ran: its run.json), whose settings as resolved then must be these (a device
    that resolves to another kind here is named)."""
    global RUN
    if ran is not None:
        differ = [f"{k} resolves to {getattr(cfg, k, None)!r} here, the run had {v!r}"
                  for k, v in ran["resolved"].items()
                  if k not in NUMBERLESS and fingerprint({k: getattr(cfg, k, None)}) != fingerprint({k: v})]
        if differ:
            cli.die(f"--init_from=resume: {'; '.join(differ)}, which would change its numbers; resume it "
                    f"where it ran (or give the setting)")
    RUN = {"id": ran["id"] if ran else secrets.token_hex(6), "settings": fingerprint(vars(cfg))}

_began = None  # out_dir, once it holds this run's run.json (what a Ctrl-C then says)

def begin(cfg, asked):
    """A new run's first files (asked: its settings as given; None for a resume), once the lock is
    held: another run's files moved aside whole (move_aside), then out_dir/run.json, the run's
    identity and its settings as given and as resolved: what --init_from=resume reads."""
    global _began
    if RANK == 0 and asked is not None:
        move_aside(cfg.out_dir)
        write_json(os.path.join(cfg.out_dir, "run.json"), {**RUN, "asked": asked, "resolved": vars(cfg)})
    _began = cfg.out_dir

def interrupted(out_dir):
    """The line of a run into out_dir stopped by Ctrl-C."""
    if _began is None or os.path.abspath(_began) != os.path.abspath(out_dir):
        return "interrupted before the run began"
    return f"interrupted: --init_from=resume continues run {RUN['id']} from its last checkpoint in {_began}"

def _run_id(out_dir):
    try:
        return str(json.load(open(os.path.join(out_dir, "run.json")))["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

def move_aside(out_dir):
    """Another run's files (RUN_FILES) in out_dir go, whole, to out_dir/previous-<its id>/, where
    --init_from=resume continues it if it was interrupted: nothing of it is lost, and nothing of
    it is mixed with this run. run.json goes last: a kill in the middle leaves it naming the rest,
    and the next run moves them to the same folder."""
    present = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    if not present:
        return
    dest = os.path.join(out_dir, f"previous-{_run_id(out_dir) or 'run-' + secrets.token_hex(3)}")
    os.makedirs(dest, exist_ok=True)
    for name in present:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
        cli.stop_at("move aside")
    print(f"note: {out_dir} held another run's files ({', '.join(present)}): moved to {dest}/ "
          f"(--init_from=resume --out_dir={dest} continues that run)")

def resume_settings(given, SETTINGS):
    """--init_from=resume: (settings, run.json) of the run in out_dir. SETTINGS: train_small's. The
    settings are the run's as resolved, and the rest of the command line may repeat the run's own
    (the interrupted command, defaults spelled out or not, with --init_from=resume added): a
    setting equal to the run's as given or as resolved is accepted; one of NUMBERLESS is taken,
    and said; any other is an error naming it. The device is resolved again (a GPU per process)."""
    out_dir = given.get("out_dir", SETTINGS["out_dir"][0])
    ckpt, path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "run.json")
    if os.path.exists(ckpt):
        load_checkpoint(ckpt)  # a truncated file is named first, whatever else is there
    if not os.path.exists(path):
        cli.die(f"{ckpt} has no {path} beside it: an older version wrote it, and resumes it; or run the "
                f"command without --init_from=resume to start over" if os.path.exists(ckpt) else
                f"{out_dir}: no checkpoint to resume from (no run has started there); run the command "
                f"without --init_from=resume to start one")
    try:
        ran = json.load(open(path, encoding="utf-8"))
        assert isinstance(ran["id"], str) and ran["asked"].keys() <= ran["resolved"].keys()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        cli.die(f"{path}: not a run's run.json ({type(e).__name__}); run without --init_from=resume to "
                f"start a new run")
    if os.path.isdir(os.path.join(out_dir, f"previous-{ran['id']}")):
        cli.die(f"{out_dir}/previous-{ran['id']}/ holds part of run {ran['id']}: a new run was moving it "
                f"aside when it stopped; start that new run again to finish the move (then resume it there)")
    asked, resolved = ran["asked"], ran["resolved"]
    missing, dropped = sorted(set(SETTINGS) - set(resolved)), sorted(set(resolved) - set(SETTINGS))
    if missing or dropped:
        cli.die(f"{path}: the run was started by another version ({', '.join(missing + dropped)} differ); "
                f"resume it with that version")
    differ, taken = [], []
    for k, v in given.items():
        if k == "init_from":
            continue
        if k in NUMBERLESS:
            taken += [f"--{k}={v!r}"] if v != resolved[k] else []
        elif v not in (asked[k], resolved[k]) and not (k == "device" and v == torch.device(resolved[k]).type):
            had = f"{asked[k]!r}" + (f", resolved to {resolved[k]!r}" if asked[k] != resolved[k] else "")
            differ.append(f"--{k}={v!r} (the run has {had})")
    if differ:
        cli.die(f"--init_from=resume continues run {ran['id']} in {out_dir} with its own settings, and these "
                f"would change its numbers: {', '.join(differ)}; drop them, or start a new run (without "
                f"--init_from=resume)")
    if taken:
        print(f"note: {', '.join(taken)}: change no number of run {ran['id']}, taken")
    cfg = SimpleNamespace(**{**resolved, "device": given.get("device", asked["device"]),
                             **{k: v for k, v in given.items() if k in NUMBERLESS}})
    cli.check_settings(cfg)
    return cfg, ran

def resume_plan(cfg, resuming, methods, model, cached):
    """Where the run goes on from, every file it will read read and checked now, before anything
    is written. resuming: a resume (else a new run, from the start); model: the settings' model
    (the files' shapes); cached: whether the toy's base is in its cache (stage 0 is then over).
    Returns a namespace: at (the index of the first stage not finished among base + methods),
    side_by_side (the run is in a side-by-side stage 1), checkpoint(stage) (the one it continues
    from, or None), finished(method), students ({method: its <method>.pt} of the finished ones),
    base_again (stage 0 is over but its cache is gone: trained again, quietly) and resumed
    ({stage: the step it goes on from}; None for a new run: which of the run's metrics.jsonl lines
    stay, metrics_log.kept_lines)."""
    stages = (["base"] if cfg.base_steps else []) + methods
    first = methods[0] if not cfg.base_steps or cached else "base"  # where a run without a checkpoint begins
    ck, cks, path = None, {}, os.path.join(cfg.out_dir, "ckpt.pt")
    if resuming and os.path.exists(path):
        ck = check_file(path, load_checkpoint(path), ("stage", "step", "config", "run"))
        if ck["stage"] not in stages + ["side by side"]:
            cli.die(f"{path}: its stage {ck['stage']!r} is none of this run's ({', '.join(stages)})")
    side = ck is not None and ck["stage"] == "side by side"
    if ck is not None and not side:
        cks[ck["stage"]] = check_file(path, ck, CHECKPOINT, model)
    for m in methods if side else []:  # each method from its own checkpoint, if it wrote one
        p = checkpoint_path(cfg, m)
        if os.path.exists(p):
            cks[m] = check_file(p, load_checkpoint(p), CHECKPOINT, model)
    if "base" in cks and cached:  # stage 0 ended after its last checkpoint: its base is reused
        del cks["base"]
    resumed = None if not resuming else {m: cks[m]["step"] if m in cks else 0 for m in methods} if side \
        else {s: c["step"] for s, c in cks.items()} or {first: 0}
    at = 0 if not resuming else stages.index(next(iter(resumed)))
    students = {m: read_student(cfg, m, model) for m in stages[:at] if m != "base"}
    if resuming and RANK == 0:
        steps = ", ".join(f"{m} at step {k}" for m, k in resumed.items())
        run = RUN["id"]
        print(f"resuming run {run} from its start: it stopped before its first checkpoint" if ck is None else
              f"resuming side by side, {steps}, of run {run} from {cfg.out_dir}" if side else
              f"resuming {ck['stage']} at step {ck['step']} of run {run} from {path}")
    return SimpleNamespace(at=at, side_by_side=side, checkpoint=cks.get, resumed=resumed, students=students,
                           finished=lambda m: stages.index(m) < at,
                           base_again=bool(resuming and cfg.base_steps and not cached and at > 0))
