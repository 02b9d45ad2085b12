"""
The paper's other claims, as experiments on the toy task that anyone can rerun on a CPU.

    python experiments.py scaling      # miscalibration against model size: base, OPD, CaOPD at four sizes
    python experiments.py entropy      # student and teacher entropy during OPD, with and without the context
    python experiments.py ood          # harder questions and an unseen operation
    python experiments.py continual    # distill on addition, then continue on multiplication
    python experiments.py estimators   # four estimators of the same reverse KL: calibration and gradient noise
    python experiments.py pacc         # P_acc from K = 2 ... 16 rollouts, and a smoothed P_acc
    python experiments.py all          # the six, one after the other

Each writes <out_dir>/<name>.json and <name>.png (out_dir: out/experiments/<name>) and prints its
table. Every train_small.py setting can be given too (--steps=300, --n_eval=1000, --seed=1, ...);
TRAIN below is where the experiments start from instead of train_small.py's defaults: fewer
distillation steps, so that each experiment fits in about 15 minutes on one CPU core.
Base and distilled models are cached in cache_dir under a hash of everything that made them
(settings, start model, training questions, the source of caopd.py, train_small.py and
data/arith.py): experiments that need the same model train it once. The entropy of every OPD and
CaOPD run is logged while it trains (train_small.entropy_stats) and cached with the model.
"""
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import time

import torch

import caopd
import train_small as ts
from data import arith

# -----------------------------------------------------------------------------
# settings of the experiments themselves (--key=value, like train_small.py's)
out_dir = ""                          # "" = out/experiments/<name>
cache_dir = "out/experiments/cache"   # base and distilled models, by the hash of what made them
sizes = "2x32,2x64,3x96,4x128"        # scaling: n_layer x n_embd (n_head = n_embd / 32)
ood_n = 500                           # ood: questions per out-of-distribution set
continual_steps = 100                 # continual: distillation steps per task
grad_batches = 8                      # estimators: independent batches for the gradient variance
Ks = "2,4,8,16"                       # pacc: rollouts per prompt
smoothed_Ks = "2"                     # pacc: the K that also run with P_acc = (c + 1) / (K + 2)
OWN = ["out_dir", "cache_dir", "sizes", "ood_n", "continual_steps", "grad_batches", "Ks", "smoothed_Ks"]
# train_small.py settings every experiment starts from (the command line overrides them)
TRAIN = dict(steps=150, n_eval=500, log_every=10, ckpt_every=10_000)
METHODS = ("opd", "caopd")
ESTIMATORS = ("full", "topk", "sampled", "sampled_baseline")
# -----------------------------------------------------------------------------

DEFAULTS = {k: getattr(ts, k) for k in ts.config_keys}  # train_small.py's own defaults
CLI = {}  # train_small.py settings given on the command line

def configure(**run):
    """train_small's settings <- its defaults, then TRAIN, the command line, and this run's own
    (the thing an experiment varies); the globals its main() would set. Returns the new,
    untrained model."""
    for k, v in {**DEFAULTS, **TRAIN, **CLI, **run}.items():
        setattr(ts, k, v)
    ts.rank, ts.world = 0, 1
    ts.check_settings()
    if ts.device == "auto":
        ts.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    torch.set_num_threads(ts.threads)
    ts.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in ts.device else ts.nullcontext()
    ts.config = {k: getattr(ts, k) for k in ts.config_keys}
    ts.ckpt_path = os.path.join(ts.out_dir, "ckpt.pt")
    model, ts.tok, ts.end_id, _ = ts.load_model()
    ts.decimals = arith.DECIMALS
    return model

def task(ops="+*", n=None, digits=None):
    """(held-out questions, sampler of training questions, verify) for a question mix."""
    held, sample_train = arith.split(ts.data_seed, n or ts.n_eval, ops, digits)
    return held, sample_train, lambda ex, text: caopd.verify_arith(ex["answer"], text)

def base_model(**run):
    """The base model of these settings (stage 0, cached), its file's name and the default task."""
    model = configure(**run)
    held, sample_train, verify = task()
    path = ts.cached_base(model, sample_train, cache_dir)
    return model, os.path.basename(path), (held, sample_train, verify)

CODE = "".join(open(m.__file__).read() for m in (caopd, ts, arith))

def trained(start, start_name, method, sample_train, verify, data="+*"):
    """A copy of `start` distilled with `method` on questions `data`, from cache_dir when these
    settings ran before. Returns (model, name of its cache file, entropy log of its run)."""
    settings = {k: v for k, v in ts.config.items()
                if k not in ("out_dir", "device", "threads", "log_every", "ckpt_every", "n_eval", "eval_batch")}
    key = hashlib.sha256(json.dumps([settings, method, start_name, data, CODE]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{method}-{key}.pt")
    model = copy.deepcopy(start)
    if os.path.exists(path):
        saved = ts.load_checkpoint(path)
        model.load_state_dict(saved["model"])
        print(f"reusing {method} model {path}")
        return model, os.path.basename(path), saved["entropy"]
    log = []
    ts.distill(model, method, sample_train, verify, entropy_log=log)
    ts.write_atomic(path, {"model": model.state_dict(), "settings": settings, "entropy": log}, "wb")
    return model, os.path.basename(path), log

def evaluate(model, name, held):
    return ts.evaluate(model, name, held, lambda ex, text: caopd.verify_arith(ex["answer"], text))

# -----------------------------------------------------------------------------
# tables and files

COLUMNS = [("acc", "accuracy", "{:.3f}"), ("conf", "mean_confidence", "{:.3f}"), ("ECE", "ece", "{:.3f}"),
           ("Brier", "brier", "{:.3f}"), ("OCG", "ocg", "{:+.3f}"), ("SPR", "spr", "{:.3f}"),
           ("AUROC", "auroc", "{:.3f}"), ("format", "format_rate", "{:.2f}")]

def table(rows, keys, columns=COLUMNS):
    """A markdown table: the row keys `keys` first, then the metric columns."""
    lines = ["| " + " | ".join(keys + [c[0] for c in columns]) + " |", "|" + "---|" * (len(keys) + len(columns))]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "-"
                                             for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

def write(name, result, t0):
    result["seconds"] = round(time.time() - t0, 1)
    result["settings"] = {"experiment": {k: globals()[k] for k in OWN}, "train_small": {**TRAIN, **CLI}}
    ts.write_atomic(os.path.join(ts.out_dir, f"{name}.json"), json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {ts.out_dir}/{name}.json and {name}.png in {result['seconds']:.0f}s")

def figure(cols, rows=1, size=4.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    return plt, fig, axes

def save(plt, fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(ts.out_dir, f"{name}.png"), dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# 1. the scaling law of miscalibration, toy edition

def scaling():
    """Base, OPD and CaOPD at each size of `sizes`, on the same held-out questions."""
    rows = []
    for size in sizes.split(","):
        n_layer, n_embd = map(int, size.split("x"))
        base, base_name, (held, sample_train, verify) = base_model(n_layer=n_layer, n_embd=n_embd,
                                                                   n_head=max(1, n_embd // 32))
        params = sum(p.numel() for p in base.parameters())
        for method in ("base",) + METHODS:
            model = base if method == "base" else trained(base, base_name, method, sample_train, verify)[0]
            m, _ = evaluate(model, method, held)
            rows.append({"size": size, "params": f"{params / 1e6:.2f}M", "model": method, **m})
    print(table(rows, ["size", "params", "model"]))
    plt, fig, axes = figure(1, size=5)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    for method, color in zip(("base",) + METHODS, ("tab:gray", "tab:red", "tab:blue")):
        pts = [r for r in rows if r["model"] == method]
        ax.plot([r["accuracy"] for r in pts], [r["mean_confidence"] for r in pts], "o-", color=color, label=method)
        for r in pts:
            ax.annotate(r["params"], (r["accuracy"], r["mean_confidence"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="accuracy", ylabel="mean stated confidence",
           title="mean confidence vs accuracy, by model size")
    ax.legend(loc="lower right")
    save(plt, fig, "scaling")
    return {"rows": rows, "table": table(rows, ["size", "params", "model"])}

# -----------------------------------------------------------------------------
# 2. entropy collapse: is the teacher more certain than the student can justify?

PARTS = ("answer", "confidence")
WHO = ("student", "teacher", "teacher_no_context")

def entropy():
    """The entropy log of the OPD (and CaOPD) run at the default size: per-token entropies on the
    completion tokens, every log_every steps (train_small.entropy_stats)."""
    base, base_name, (held, sample_train, verify) = base_model()
    logs = {method: trained(base, base_name, method, sample_train, verify)[2] for method in METHODS}
    cols = [(f"{who} {part}", f"{who}_{part}", "{:.3f}") for part in PARTS for who in WHO]
    rows = [{"method": method, "step": r["step"], **r} for method in METHODS for r in logs[method]
            if r["step"] in (0, ts.steps // 2 // ts.log_every * ts.log_every, (ts.steps - 1) // ts.log_every * ts.log_every)]
    print(table(rows, ["method", "step"], cols))
    plt, fig, axes = figure(2, len(METHODS))
    for i, method in enumerate(METHODS):
        for j, part in enumerate(PARTS):
            ax = axes[i, j]
            for who, color in zip(WHO, ("tab:blue", "tab:red", "tab:orange")):
                ax.plot([r["step"] for r in logs[method]], [r[f"{who}_{part}"] for r in logs[method]], "o-",
                        color=color, label=who.replace("_", " "))
            ax.set(xlabel="step", ylabel="mean entropy (nats)", title=f"{method}: {part} tokens", ylim=(0, None))
            ax.legend(fontsize=8)
    save(plt, fig, "entropy")
    return {"log": logs, "table": table(rows, ["method", "step"], cols)}

# -----------------------------------------------------------------------------
# 3. out of distribution: harder questions, an unseen operation

def ood_sets():
    """name -> questions. "in_dist": the held-out questions of training's mix. "add4": additions
    with a 4-digit operand (training's have at most 3; the prompt is two tokens longer). "mul3":
    multiplications with a 3-digit operand (training's have at most 2; same prompt length).
    "sub": subtractions, an operation never trained (same prompt length)."""
    big = lambda ex, d: max(map(int, re.split(r"[-+*]", ex["id"]))) >= 10 ** (d - 1)
    sets = {"in_dist": task()[0]}
    for name, ops, digits, keep in (("add4", "+", 4, lambda ex: big(ex, 4)), ("mul3", "*", 3, lambda ex: big(ex, 3)),
                                    ("sub", "-", None, lambda ex: True)):
        held = [ex for ex in task(ops, 4 * ood_n, digits)[0] if keep(ex)][:ood_n]
        assert len(held) == ood_n, f"only {len(held)} {name} questions; lower --ood_n"
        sets[name] = held
    return sets

def ood():
    base, base_name, (held, sample_train, verify) = base_model()
    models = {"base": base, **{m: trained(base, base_name, m, sample_train, verify)[0] for m in METHODS}}
    sets, rows, results = ood_sets(), [], {}
    for method, model in models.items():
        for name, questions in sets.items():
            m, records = evaluate(model, method, questions)
            rows.append({"set": name, "model": method, **m})
            results[f"{method} {name}"] = (m, records)
    rows.sort(key=lambda r: list(sets).index(r["set"]))
    print(table(rows, ["set", "model"]))
    ts.reliability_diagram(results, os.path.join(ts.out_dir, "ood.png"), columns=len(sets))
    return {"rows": rows, "table": table(rows, ["set", "model"]),
            "examples": {name: [ex["question"] for ex in questions[:3]] for name, questions in sets.items()}}

# -----------------------------------------------------------------------------
# 4. continual learning: task A (addition), then task B (multiplication)

def continual():
    """OPD and CaOPD distilled on additions for continual_steps, then continued on
    multiplications; each phase starts a new frozen teacher (the student at its start).
    Evaluated on held-out additions and multiplications after each phase."""
    base, base_name, _ = base_model(steps=continual_steps)
    (held_a, train_a, verify), (held_b, train_b, _) = task("+"), task("*")
    rows = []
    evaluate_both = lambda model, method, phase: [
        rows.append({"model": method, "after": phase, "eval on": name, **evaluate(model, method, held)[0]})
        for name, held in (("A: add", held_a), ("B: mul", held_b))]
    evaluate_both(base, "base", "base")
    for method in METHODS:
        after_a, name_a, _ = trained(base, base_name, method, train_a, verify, data="+")
        evaluate_both(after_a, method, "A")
        after_b, _, _ = trained(after_a, name_a, method, train_b, verify, data="*")
        evaluate_both(after_b, method, "A then B")
    keys = ["model", "after", "eval on"]
    print(table(rows, keys))
    plt, fig, axes = figure(2)
    for ax, name in zip(axes[0], ("A: add", "B: mul")):
        for method, color in zip(METHODS, ("tab:red", "tab:blue")):
            pts = [r for r in rows if r["eval on"] == name and r["model"] in ("base", method)]
            x = range(len(pts))
            ax.plot(x, [r["accuracy"] for r in pts], "o-", color=color, label=f"{method} accuracy")
            ax.plot(x, [r["mean_confidence"] for r in pts], "s--", color=color, label=f"{method} mean confidence")
            ax.set_xticks(list(x), [r["after"] for r in pts])
        ax.set(ylim=(0, 1.05), xlabel="after training on", title=f"evaluated on {name}")
        ax.legend(fontsize=7)
    save(plt, fig, "continual")
    return {"rows": rows, "table": table(rows, keys)}

# -----------------------------------------------------------------------------
# 5. estimators of the reverse KL: calibration, accuracy, gradient noise

def gradient_noise(model, held_out_train, verify):
    """For the fixed model (its own frozen teacher), grad_batches independent CaOPD batches; on
    each, the gradient of every estimator on the same rollouts. Returns per estimator: the trace
    of the gradients' covariance across batches, the mean squared distance to the full-vocabulary
    gradient of the same batch, the mean cosine to it, and the cosine of the mean gradients."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    rng, grads = random.Random(ts.seed + 2), {e: [] for e in ESTIMATORS}
    for b in range(grad_batches):
        exs = held_out_train(rng, ts.prompts_per_step)
        prompts, completions, teacher_prompts, *_ = ts.rollout_batch(
            model, "caopd", exs, verify, 1_000_000 + b, (0, ts.prompts_per_step * ts.K))
        for e in ESTIMATORS:
            ts.estimator = e
            model.zero_grad(set_to_none=True)
            ts.kl_loss(model, teacher, prompts, completions, teacher_prompts)[0].backward()
            grads[e].append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    ts.estimator = "full"
    G = {e: torch.stack(g) for e, g in grads.items()}  # (batches, parameters)
    cos = torch.nn.functional.cosine_similarity
    return {e: {"trace_cov": G[e].var(0).sum().item(), "mean_sq_norm": (G[e] ** 2).sum(1).mean().item(),
                "sq_dist_to_full": ((G[e] - G["full"]) ** 2).sum(1).mean().item(),
                "cos_to_full": cos(G[e], G["full"], dim=1).mean().item(),
                "cos_of_means": cos(G[e].mean(0), G["full"].mean(0), dim=0).item()} for e in ESTIMATORS}

def estimators():
    """CaOPD with each estimator from the same base; and the gradient noise of each at the base."""
    base, base_name, (held, sample_train, verify) = base_model()
    rows = []
    for e in ESTIMATORS:
        configure(estimator=e)
        model = trained(base, base_name, "caopd", sample_train, verify)[0]
        rows.append({"estimator": e, **evaluate(model, e, held)[0]})
    configure()
    noise = gradient_noise(base, sample_train, verify)
    for r in rows:
        r.update(noise[r["estimator"]])
    cols = COLUMNS[:6] + [("grad trace cov", "trace_cov", "{:.3g}"), ("E|g - g_full|^2", "sq_dist_to_full", "{:.3g}"),
                          ("cos to full (per batch)", "cos_to_full", "{:.3f}"), ("cos of means", "cos_of_means", "{:.3f}")]
    print(table(rows, ["estimator"], cols))
    plt, fig, axes = figure(2, size=4.6)
    x = range(len(rows))
    axes[0, 0].bar([i - 0.2 for i in x], [r["accuracy"] for r in rows], 0.4, label="accuracy")
    axes[0, 0].bar([i + 0.2 for i in x], [r["mean_confidence"] for r in rows], 0.4, label="mean confidence")
    axes[0, 0].plot(list(x), [r["ece"] for r in rows], "ko-", label="ECE")
    axes[0, 0].set(title="after CaOPD with each estimator", ylim=(0, 1.05))
    axes[0, 1].bar(list(x), [r["trace_cov"] for r in rows])
    axes[0, 1].set(yscale="log", title=f"gradient variance at the base (trace, {grad_batches} batches)")
    for ax in axes[0]:
        ax.set_xticks(list(x), [r["estimator"] for r in rows], fontsize=8)
    axes[0, 0].legend(fontsize=8)
    save(plt, fig, "estimators")
    return {"rows": rows, "table": table(rows, ["estimator"], cols)}

# -----------------------------------------------------------------------------
# 6. P_acc from K rollouts, raw and smoothed

def pacc():
    base, base_name, (held, sample_train, verify) = base_model()
    runs = [(int(k), False) for k in Ks.split(",") if k] + [(int(k), True) for k in smoothed_Ks.split(",") if k]
    rows = []
    for k, smooth in runs:
        configure(K=k, smooth_p_acc=smooth)
        model = trained(base, base_name, "caopd", sample_train, verify)[0]
        rows.append({"K": k, "P_acc": "(c+1)/(K+2)" if smooth else "c/K", **evaluate(model, "caopd", held)[0]})
    print(table(rows, ["K", "P_acc"]))
    plt, fig, axes = figure(3, size=3.8)
    for smooth, style in ((False, "o-"), (True, "s--")):
        pts = [r for r in rows if (r["P_acc"] != "c/K") == smooth]
        for ax, key in zip(axes[0], ("ece", "spr", "accuracy")):
            ax.plot([r["K"] for r in pts], [r[key] for r in pts], style, label="(c+1)/(K+2)" if smooth else "c/K")
            ax.set(xscale="log", xlabel="K (rollouts per prompt)", title=key)
            ax.set_xticks([r["K"] for r in rows], [str(r["K"]) for r in rows])
    axes[0, 0].legend()
    save(plt, fig, "pacc")
    return {"rows": rows, "table": table(rows, ["K", "P_acc"])}

# -----------------------------------------------------------------------------

EXPERIMENTS = {"scaling": scaling, "entropy": entropy, "ood": ood, "continual": continual,
               "estimators": estimators, "pacc": pacc}

def main(argv):
    if not argv or argv[0] not in (*EXPERIMENTS, "all"):
        ts.die(f"usage: python experiments.py {{{','.join(EXPERIMENTS)},all}} [--key=value ...]")
    names = list(EXPERIMENTS) if argv[0] == "all" else [argv[0]]
    own, rest = [], []
    for arg in argv[1:]:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") and "=" in arg else None
        (own if key in OWN else rest).append(arg)
    for arg in own:
        key, text = arg[2:].split("=", 1)
        kind = type(globals()[key])
        try:
            globals()[key] = kind(text)
        except ValueError:
            ts.die(f"--{key} must be a {kind.__name__}, got {text!r}")
        print(f"override: {key} = {globals()[key]!r}")
    for k, v in {**DEFAULTS, **TRAIN}.items():
        setattr(ts, k, v)
    ts.world = 1
    given = ts.parse_args(rest)  # type checks, prints, and --smoke's shrunken settings
    if ts.init_from != "scratch" or ts.task != "arith":
        ts.die("the experiments run on the toy task: --init_from=scratch --task=arith")
    CLI.update({k: getattr(ts, k) for k in given | (set(ts.SMOKE) if ts.smoke else set())})
    os.makedirs(cache_dir, exist_ok=True)
    for name in names:
        t0 = time.time()
        CLI["out_dir"] = out_dir or os.path.join("out", "experiments", name)
        configure()
        ts.prepare_out_dir()
        print(f"\n=== {name} -> {ts.out_dir}")
        write(name, EXPERIMENTS[name](), t0)

if __name__ == "__main__":
    main(sys.argv[1:])
