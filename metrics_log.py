"""
The training log: out_dir/metrics.jsonl, one JSON line per printed step and per evaluation, and
the same records in an experiment tracker (wandb) when --wandb_project names one.
"""
import json
import math
import os
import shutil
import sys
import time

import torch

import cli
import run_dir
from parallel import RANK

def import_tracker(project):
    """wandb, imported only when --wandb_project names a project (None otherwise); checked before
    anything loads, so a missing package is one line, not a traceback after the base is trained."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        cli.die(f"--wandb_project={project!r}: the wandb package is not installed (pip install wandb)")
    return wandb

def peak_memory_mib(device):
    """This process's peak memory so far: the device's allocations on a GPU, resident memory elsewhere."""
    if "cuda" in str(device):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if os.name == "nt":  # no getrusage
        return None
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)

# the fields a record needs to be drawn (training_curves); the base trains on no rollouts
METRICS_NEED = {"train": ("stage", "step", "stated_confidence", "rollout_accuracy", "p_acc"),
                "eval": ("stage", "step", "ece"), "base train": ("stage", "step")}

def _read(path, interrupted=False):
    """(the header line's record or None, the other records) of a metrics.jsonl; see read_metrics."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        if interrupted:
            return None, []
        cli.die(f"{path}: no such file")
    except (OSError, UnicodeDecodeError) as e:
        cli.die(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})")
    header, records = None, []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            if interrupted and i == len(lines):
                break
            cli.die(f"{path}:{i}: not a JSON line ({e.msg})")
        if i == 1 and isinstance(r, dict) and r.get("kind") == "run":
            header = r
            continue
        if not isinstance(r, dict) or r.get("kind") not in ("train", "eval"):
            cli.die(f"{path}:{i}: not a metrics.jsonl record (a JSON object whose kind is 'train' or 'eval')")
        kind = "base train" if r["kind"] == "train" and r.get("stage") == "base" else r["kind"]
        missing = [k for k in METRICS_NEED[kind] if k not in r]
        if missing:
            cli.die(f"{path}:{i}: a {r['kind']} record without {', '.join(missing)}")
        for k in METRICS_NEED[kind]:  # what the curves draw: a step count, finite numbers
            v = r[k]
            ok = isinstance(v, str) if k == "stage" else (type(v) is int and v >= 0) if k == "step" else \
                type(v) in (int, float) and math.isfinite(v)
            if not ok:
                want = {"stage": "a name", "step": "a whole number >= 0"}.get(k, "a finite number")
                cli.die(f"{path}:{i}: its {k} is {json.dumps(v)}, not {want}")
        records.append(r)
    return header, records

def read_metrics(path, interrupted=False):
    """The records of a metrics.jsonl (its first line, the run's header, left out). A missing file,
    or a line that is not a record, is a one-line error naming the file and line. interrupted: the
    file of a run being resumed, which may end in half a line (killed while writing it): left out."""
    return _read(path, interrupted)[1]

def start_tracker(cfg, tracker):
    """The tracker's run (wandb.init; None without --wandb_project), started before the run takes
    out_dir: one that fails to start is one line, and leaves out_dir as it was."""
    if not tracker or RANK != 0:
        return None
    made = run_dir.check_writable(cfg.out_dir)  # wandb writes out_dir/wandb/
    before = os.path.exists(os.path.join(cfg.out_dir, "wandb"))
    try:
        return tracker.init(project=cfg.wandb_project, config=vars(cfg), dir=cfg.out_dir)
    except (tracker.Error, ValueError, OSError) as e:  # its own errors; ValueError: its settings' checks
        if made:
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
        elif not before:
            shutil.rmtree(os.path.join(cfg.out_dir, "wandb"), ignore_errors=True)
        cli.die(f"--wandb_project={cfg.wandb_project!r}: wandb failed to start: {cli.first_line(e)}")

def metrics_log(cfg, tracker, run=None, kept=()):
    """Rank 0's training log. Returns (log, finish). log(record) appends the record, with "time"
    (seconds of the run so far) and "peak_memory_mib", to out_dir/metrics.jsonl as one JSON line,
    flushed (a killed run keeps every line before the kill), and to the tracker's `run` (from
    start_tracker) as row n of its history, n = the record's number in the file. The file's first
    line is the run's header, {"kind": "run", "run": run_dir.RUN}; then kept, the records a resumed
    run keeps (written atomically with it); a new run starts with the header alone.
    finish(images) logs {name: png path} to the tracker and ends its run. Other ranks log nothing.
    Side by side (--workers=2), the two methods' processes append their lines to the same file (one
    write a line, in append mode: lines interleave whole), and this process sends them to the
    tracker in file order with its own next line."""
    if RANK != 0:
        return (lambda record: None), (lambda images: None)
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    header = {"kind": "run", "run": run_dir.RUN}
    run_dir.write_atomic(path, "".join(json.dumps(r) + "\n" for r in [header, *kept]))
    f = open(path, "a", encoding="utf-8")
    start = time.time() - (kept[-1]["time"] if kept else 0.0)  # a resumed run's clock goes on
    state = {"run": run, "n": len(kept), "pid": os.getpid(), "size": os.path.getsize(path)}

    def track(call):
        """A tracker that fails in the middle of a run warns once and is dropped: the run and
        metrics.jsonl go on without it."""
        if state["run"] is None or os.getpid() != state["pid"]:  # a forked process: the run is its parent's
            return
        try:
            call(state["run"])
        except Exception as e:  # whatever it raises (network, disk, its own errors), the run is worth more
            from tqdm import tqdm
            tqdm.write(f"warning: wandb failed ({type(e).__name__}: {cli.first_line(e)}); the run goes on "
                       f"without it, {path} has every line")
            state["run"] = None

    def catch_up():  # lines the methods' own processes wrote since this one last logged
        with open(path, "rb") as r:
            r.seek(state["size"])
            new = r.read()
        state["size"] += len(new)
        for line in new.decode("utf-8").splitlines():
            send(json.loads(line))

    def send(record):
        # the tracker's keys: kind/stage/name, so that OPD's and CaOPD's steps do not collide; numbers only
        row = {f"{record['kind']}/{record['stage']}/{k}": v for k, v in record.items()
               if isinstance(v, (int, float))}  # intervals (lists) stay in the file
        track(lambda run: run.log(row, step=state["n"]))
        state["n"] += 1

    def log(record):
        if os.getpid() == state["pid"]:
            catch_up()
        # JSON has no NaN: a non-finite loss or gradient norm (a skipped update) is null
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        record.update(time=round(time.time() - start, 3), peak_memory_mib=peak_memory_mib(cfg.device))
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as e:
            cli.cannot_write(path, e)
        if os.getpid() == state["pid"]:
            send(record)
            state["size"] = f.tell()
        cli.stop_at(f"log {record['kind']} {record['stage']} {record['step']}")

    def finish(images):
        catch_up()
        f.close()
        track(lambda run: run.log({name: tracker.Image(p) for name, p in images.items()}, step=state["n"]))
        track(lambda run: run.finish())
    return log, finish

def kept_on_resume(record, order, resumed):
    """Whether a line of an interrupted run's metrics.jsonl stays when it resumes. order: the run's
    stages; resumed: {stage: the step it goes on from} (side by side, both methods). Kept: the lines
    of the stages before those (their final evaluations too: they are not logged again) and, of a
    stage that goes on, those of the steps before its step and the evaluations up to it (the one at
    its step came before the checkpoint). So the file goes on without a duplicated or missing line."""
    if record["stage"] not in order:
        return False
    if record["stage"] not in resumed:  # finished before, or not begun
        return order.index(record["stage"]) < min(order.index(s) for s in resumed)
    step = resumed[record["stage"]]
    if record["kind"] == "train":
        return record["step"] < step
    return not record.get("final") and record["step"] <= step

def kept_lines(cfg, resumed, order):
    """The lines of out_dir/metrics.jsonl a resumed run keeps (resumed, order: kept_on_resume's);
    none for a new run (resumed None). The file must be this run's (its header: run_dir.RUN); a
    missing one is said (its lines are lost). Read, and checked, before anything is written."""
    if resumed is None or RANK != 0:
        return []
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    header, records = _read(path, interrupted=True)
    if not os.path.exists(path):
        print(f"note: {path} is missing: the lines the run logged before its checkpoint are lost")
    elif header is None or header.get("run") != run_dir.RUN:
        theirs = header["run"].get("id") if header and isinstance(header.get("run"), dict) else None
        cli.die(f"{path} is of run {theirs}, not of run {run_dir.RUN['id']} (this out_dir's run.json); "
                f"move it away to resume without its lines")
    return [r for r in records if kept_on_resume(r, order, resumed)]

# -----------------------------------------------------------------------------
# what a distillation step and an evaluation write: a record in the log, then the printed line

class Throughput:
    """Tokens per second of the rollouts and of training since the last printed step, and the
    seconds since the stage began."""

    def __init__(self):
        self.t0 = time.time()
        self.sampled = self.trained = self.t_sample = self.t_train = 0.0

    def add(self, stats):
        from parallel import WORLD
        self.sampled += stats["sampled_tokens"] * WORLD
        self.trained += stats["trained_tokens"] * WORLD
        self.t_sample += stats["seconds_sampling"]
        self.t_train += stats["seconds_training"]

def train_step(log, loss, method, step, stats, skipped, since):
    """A printed step of stage 1 (loss: the divergence's name), logged first: a printed step is in
    metrics.jsonl. Then the throughput counts start again."""
    from tqdm import tqdm
    if log:
        log({"kind": "train", "stage": method, "method": method, "step": step, "loss": stats["loss"],
             "rollout_accuracy": stats["rollout_accuracy"], "p_acc": stats["p_acc"],
             "stated_confidence": stats["stated_confidence"], "teacher_shown": stats["teacher_shown"],
             "format_rate": stats["format_rate"],
             "lr": stats["lr"], "grad_norm": stats["grad_norm"], "skipped": skipped,
             "rollout_tokens_per_s": since.sampled / since.t_sample, "train_tokens_per_s": since.trained / since.t_train})
    tqdm.write(f"{method:5s} step {step:4d} | {loss} KL {stats['loss']:.4f} | rollout acc {stats['rollout_accuracy']:.3f}"
               f" | P_acc {stats['p_acc']:.3f} | stated conf {stats['stated_confidence']:.3f}"
               f" | teacher shown {stats['teacher_shown']:.3f}"
               f" | format {stats['format_rate']:.2f} | {time.time() - since.t0:.1f}s")
    since.sampled = since.trained = since.t_sample = since.t_train = 0.0

def evaluation(log, stage, step, metrics, final=True):
    """A held-out evaluation of stage's model at step: logged on rank 0 (metrics None elsewhere);
    one during distillation (final=False) is also printed."""
    if metrics is None:
        return
    if log:
        log({"kind": "eval", "stage": stage, "method": None if stage == "base" else stage, "step": step,
             "final": final, **metrics})
    if not final:
        from tqdm import tqdm
        m = metrics
        tqdm.write(f"{stage:5s} step {step:4d} | held-out acc {m['accuracy']:.3f} | conf {m['mean_confidence']:.3f}"
                   f" | ECE {m['ece']:.3f} | OCG {m['ocg']:+.3f} | SPR {m['spr']:.3f} | AUROC {m['auroc']:.3f}")
