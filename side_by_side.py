"""
OPD and CaOPD side by side (--workers=2): the two methods distilled at the same time, each in a
forked process of its own and on a core of its own, with the numbers of one after the other. Each
method keeps its own checkpoint (ckpt-<method>.pt); out_dir/ckpt.pt says the run is at this stage.
"""
import os
import sys

import cli
import parallel
import run_dir
from parallel import WORLD

def how_many(cfg):
    """--workers: 0 is 2 where it pays (the toy's two methods on a CPU with a core for each), else 1."""
    if cfg.workers:
        return cfg.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pays = (cfg.method == "both" and cfg.init_from == "scratch" and cfg.device == "cpu" and WORLD == 1
            and sys.platform == "linux" and cores >= 2 * cfg.threads)
    return 2 if pays else 1

def run(cfg, distilled, methods, plan):
    """distilled(method) for every method at once, each in a process of its own. A new stage 1 first
    clears the methods' old checkpoints and marks ckpt.pt, so that a resume finds them. A process
    that fails or Ctrl-C stops both: one line, and --init_from=resume continues each from its own
    (a process that said why itself, one line on exit codes 1 and 2, is not named again)."""
    if not plan.side_by_side:
        for m in methods:
            if os.path.exists(run_dir.checkpoint_path(cfg, m)):
                os.remove(run_dir.checkpoint_path(cfg, m))  # of an earlier try of this stage
        marker = {"stage": "side by side", "step": 0, "config": vars(cfg), "run": run_dir.RUN}
        run_dir.write_atomic(os.path.join(cfg.out_dir, "ckpt.pt"), marker, "wb")
    failed = parallel.side_by_side(distilled, methods)  # Ctrl-C: KeyboardInterrupt, one line from main
    if failed and failed[1] == 130:  # Ctrl-C that reached only that process
        raise KeyboardInterrupt
    if failed and failed[1] in (1, 2):
        sys.exit(failed[1])
    if failed:
        m, code = failed
        cli.die(f"the {m} process failed (exit code {code}), so the run stops; --init_from=resume continues both "
                f"methods from their checkpoints in {cfg.out_dir}", code=1)
