"""
The paper's other claims, as experiments on the toy task that anyone can rerun on a CPU.

    python experiments.py scaling      # miscalibration against model size: base, OPD, CaOPD at four sizes
    python experiments.py entropy      # student and teacher entropy during OPD, with and without the context
    python experiments.py ood          # harder questions and an unseen operation
    python experiments.py continual    # distill on addition, then continue on multiplication
    python experiments.py estimators   # four estimators of the same reverse KL: calibration and gradient noise
    python experiments.py pacc         # P_acc from K = 2 ... 16 rollouts, and a smoothed P_acc
    python experiments.py replacements # CaOPD with each of its three replacements left out, and alone
    python experiments.py baselines    # recalibrated OPD, self-consistency: with intervals
    python experiments.py all          # the eight, one after the other

Each writes <out_dir>/<name>.json and <name>.png (out_dir: out/experiments/<name>) and prints its
table. Every run starts from train_small.py's defaults (its distillation steps, its held-out
questions), and every train_small.py setting can be given too (--steps=300, --seed=1, ...); TRAIN
below only logs more often and skips the checkpoints.
Base and distilled models are cached in cache_dir under a hash of everything that made them
(settings, start model, training questions, the source of the code that trains them):
experiments that need the same model train it once. The entropy of every OPD and CaOPD run is
logged while it trains (entropy_stats below) and cached with the model.
Also here: the ablation-only estimators of the reverse KL (top-k + tail, sampled token, sampled
token with a baseline) and the entropy, which the method in caopd.py does not need.

    python experiments.py --help       # the experiments' settings, then train_small.py's
"""
import copy
import functools
import hashlib
import json
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F

import calibration
import caopd
import cli
import hf
import memory
import models
import parallel
import questions
import report
import run_dir
import tokenizer
import toy_base
import train_small as ts
from data import arith

# -----------------------------------------------------------------------------
# settings: the experiments' own (--key=value, like train_small.py's, which can be given too)
# experiments
out_dir = ""                          # "" = out/experiments/<name>
cache_dir = "out/experiments/cache"   # base and distilled models, by the hash of what made them
sizes = "2x32,2x64,3x96,4x128"        # scaling: n_layer x n_embd (n_head = n_embd / 32)
ood_n = 500                           # ood: questions per out-of-distribution set
grad_batches = 8                      # estimators: independent batches for the gradient variance
estimator_topk = 8                    # estimators: k of the top-k + tail estimator
Ks = "2,4,8,16"                       # pacc: rollouts per prompt
smoothed_Ks = "2"                     # pacc: the K that also run with P_acc = (c + 1) / (K + 2)
seeds = "0,1"                         # replacements: the training seeds each variant runs with
# baselines
n_calib = 2000                        # baselines: questions recalibration is fitted on, never scored (>= 200)
calib_seed = 1                        # baselines: draws them (not data_seed: it draws the scored ones)
n_resamples = 1000                    # baselines: bootstrap resamples of the scored questions (seed 0)
# -----------------------------------------------------------------------------
OWN = cli.settings_block(globals(), __file__)
# train_small.py settings every experiment starts from (the command line overrides them)
TRAIN = dict(log_every=10, ckpt_every=10_000)
# the default question mix, also under --smoke: each experiment builds its own question sets on it
TASK = dict(arith_ops="+*", arith_digits=0)
METHODS = ("opd", "caopd")
CLI = {}  # train_small.py settings given on the command line

def start():
    """TRAIN, less what --smoke shrinks when it is given (smoke wins over TRAIN, the command line over both)."""
    return {**{k: v for k, v in TRAIN.items() if not (CLI.get("smoke") and k in ts.SMOKE)}, **TASK}

def configure(**run):
    """(settings, new untrained model, tokenizer) of one run: train_small's defaults, then TRAIN, the
    command line, and this run's own (the thing an experiment varies)."""
    cfg = ts.settings(**{**start(), **CLI, **run})
    cfg.device = cli.resolve_device(cfg.device)
    cfg.dtype = cli.resolve_dtype(cfg.dtype, cfg.device)
    torch.set_num_threads(cfg.threads)
    model, tok, _, _ = models.load_model(cfg)
    return cfg, model, tok

def base_model(**run):
    """The base model of these settings (stage 0, cached): (settings, model, tokenizer, its file's
    name, the default task)."""
    cfg, model, tok = configure(**run)
    held, sample_train, _ = questions.load_task(cfg, tok, None, None)
    path = toy_base.cached_base(cfg, model, tok, sample_train, cache_dir)
    return cfg, model, tok, os.path.basename(path), (held, sample_train)

CODE = "".join(open(m.__file__).read() for m in (caopd, ts, cli, hf, models, questions, run_dir, tokenizer, parallel,
                                                   toy_base, arith))

def trained(cfg, tok, start, start_name, method, sample_train, data="+*", estimator="full"):
    """A copy of `start` distilled with `method` on questions `data`, from cache_dir when these
    settings ran before. Returns (model, name of its cache file, entropy log of its run)."""
    settings = {k: v for k, v in vars(cfg).items()
                if k not in ("out_dir", "device", "threads", "log_every", "ckpt_every", "n_eval", "eval_batch")}
    key = hashlib.sha256(json.dumps([settings, method, start_name, data, estimator, estimator_topk, CODE])
                         .encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{method}-{key}.pt")
    model = copy.deepcopy(start)
    if os.path.exists(path):
        saved = run_dir.load_checkpoint(path)
        model.load_state_dict(saved["model"])
        print(f"reusing {method} model {path}")
        return model, os.path.basename(path), saved["entropy"]
    log = []
    ts.distill(cfg, ts.distiller(cfg, model), tok, method, sample_train, questions.verify_example, estimator=ESTIMATORS[estimator],
               on_log=lambda *a: log.append(entropy_stats(tok, *a)))
    run_dir.write_atomic(path, {"model": model.state_dict(), "settings": settings, "entropy": log}, "wb")
    return model, os.path.basename(path), log

def evaluate(cfg, tok, model, name, held):
    return ts.evaluate(cfg, caopd.Distiller(model, None), tok, name, held, questions.verify_example)

# -----------------------------------------------------------------------------
# estimators of the reverse KL and the entropy, for the ablations below

# Other estimators of the same per-token reverse KL as caopd.fused_linear_kl. Each takes its
# arguments and returns a scalar whose VALUE estimates the weighted mean KL and whose GRADIENT is
# the estimator's gradient. They form (N, V) logits in plain autograd: fine for the toy's 321 tokens, and
# deliberately so: they are here to be compared, not to save memory.

def _log_probs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask):
    acc = torch.promote_types(student_hidden.dtype, torch.float32)  # softmax math in fp32 at least
    logp_s = F.log_softmax((student_hidden @ student_weight.T).to(acc), -1)  # (N, V)
    logp_t = F.log_softmax((teacher_hidden @ teacher_weight.T).to(acc), -1).detach()  # (N, V)
    w = mask.detach().to(logp_s.dtype)
    return logp_s, logp_t, w / w.sum().clamp(min=1e-30)  # each position's share of the mean

def topk_tail_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, k):
    """KL(p_s || p_t) over k + 1 outcomes: the student's k most likely tokens S, and one "tail"
    bucket holding the rest of each distribution's mass (1 - p(S)). Coarsening two distributions
    the same way never increases their KL, so this is a lower bound on the full KL, exact when
    the k tokens carry all the mass where the two differ. S is chosen without gradient. Only the
    teacher's probabilities of k tokens are needed (with a real teacher: no full distribution)."""
    logp_s, logp_t, w = _log_probs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask)
    top = logp_s.detach().topk(min(k, logp_s.shape[1] - 1), -1).indices  # (N, k)
    ls, lt = logp_s.gather(1, top), logp_t.gather(1, top)  # (N, k)
    tail = lambda lp: torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))  # (N,) log(1 - p(S))
    ls, lt = torch.cat([ls, tail(ls)[:, None]], 1), torch.cat([lt, tail(lt)[:, None]], 1)  # (N, k + 1)
    return ((ls.exp() * (ls - lt)).sum(-1) * w).sum()

def sampled_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, tokens, baseline=False):
    """The sampled-token (policy-gradient) estimator: only the token y_t actually in the
    completion is scored. Per position, with reward r = log p_t(y) - log p_s(y):
        KL(p_s || p_t) = E_{y ~ p_s}[-r]                 (so -r is an unbiased estimate of the value)
        d KL / d theta = E_y[(log p_s(y) - log p_t(y)) d log p_s(y)] + E_y[d log p_s(y)]
                       = E_y[-r d log p_s(y)]             (the second term is d(sum_y p_s(y)) = 0)
    so the surrogate -sg(r) log p_s(y) has, in expectation over y ~ p_s, the full-vocabulary
    gradient at that position (sg = no gradient). Like the full loss it treats each position's
    state as given (per-token reward, no return-to-go): both estimate the same gradient.
    baseline=True subtracts the value b = E_y[r] = -KL(p_s || p_t), in closed form over the
    vocabulary and without gradient (the control variate of "KL for a KL", vOPD): the advantage is
    r - b = r + KL. E_y[b d log p_s(y)] = b * 0, so the expectation is unchanged; the variance
    falls when r and its mean move together.
    Unbiased only where y ~ p_s: CaOPD replaces the confidence token (and the end token) with
    P_acc, which the student did not sample. There the surrogate is a weighted log-likelihood
    step on the written token, pushed up when the teacher likes it more than the student does.
    tokens (N,): the completion token each position predicts (any value where mask is 0)."""
    logp_s, logp_t, w = _log_probs(student_hidden, student_weight, teacher_hidden, teacher_weight, mask)
    y = tokens[:, None]
    logp_y = logp_s.gather(1, y)[:, 0]  # (N,) log p_s(y_t), with gradient
    reward = (logp_t.gather(1, y)[:, 0] - logp_y).detach()  # (N,) log p_t(y_t) - log p_s(y_t)
    advantage = reward
    if baseline:
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1).detach()  # (N,) closed form
        advantage = reward + kl  # r - b with b = -KL
    surrogate = (-advantage * logp_y * w).sum()
    # value: the sampled estimate of the mean KL (mean of -r); gradient: the surrogate's
    return surrogate - surrogate.detach() + (-reward * w).sum()

def entropy(hidden, weight):
    """Per-position entropy (nats) of softmax(hidden @ weight.T): hidden (N, d), weight (V, d) -> (N,)."""
    logits = hidden @ weight.T  # (N, V)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(logp.exp() * logp).sum(-1)

ESTIMATORS = {  # name -> a function of kl_backward's estimator arguments; None is the fused loss
    "full": None,
    "topk": lambda hs, ws, ht, wt, w, tokens: topk_tail_kl(hs, ws, ht, wt, w, estimator_topk),
    "sampled": lambda hs, ws, ht, wt, w, tokens: sampled_kl(hs, ws, ht, wt, w, tokens),
    "sampled_baseline": lambda hs, ws, ht, wt, w, tokens: sampled_kl(hs, ws, ht, wt, w, tokens, baseline=True),
}

@torch.no_grad()
def entropy_stats(tok, step, model, teacher, prompts, completions, teacher_prompts):
    """Mean per-token entropy (nats) of the student, of the teacher with its privileged context,
    and of the teacher on the student's prompt (no context), on the completion tokens: answer
    digits, the confidence value, and all counted tokens."""
    hs, lens = caopd.completion_hidden(model, prompts, completions)  # (B, L, C)
    ht, _ = caopd.completion_hidden(teacher, teacher_prompts, completions)
    h0, _ = caopd.completion_hidden(teacher, prompts, completions)  # the teacher without its context
    counted = torch.arange(hs.shape[1])[None] < torch.tensor(lens)[:, None]  # (B, L)
    tokens = torch.tensor([c + [-1] * (hs.shape[1] - len(c)) for c in completions])  # (B, L)
    digit_ids = [t for d in "0123456789" for t in tokenizer.encode(tok, d)]
    parts = {"answer": torch.isin(tokens, torch.tensor(digit_ids)) & counted,
             "confidence": torch.isin(tokens, torch.tensor(tokenizer.confidence_value_ids(tok))) & counted,
             "all": counted}
    row = {"step": step}
    for who, h, w in (("student", hs, caopd.output_weight(model)), ("teacher", ht, caopd.output_weight(teacher)),
                      ("teacher_no_context", h0, caopd.output_weight(teacher))):
        ent = entropy(h.flatten(0, 1), w).view(h.shape[:2]).cpu()  # (B, L)
        for part, sel in parts.items():
            row[f"{who}_{part}"] = ent[sel].mean().item() if sel.any() else float("nan")
    return row

# -----------------------------------------------------------------------------
# tables and files

OUT = ""  # the folder of the experiment that runs now (main sets it)

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
    run_dir.write_json(os.path.join(OUT, f"{name}.json"), result)
    print(f"\nwrote {OUT}/{name}.json and {name}.png in {result['seconds']:.0f}s")

def figure(cols, rows=1, size=4.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    return plt, fig, axes

def save(plt, fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------
# 1. the scaling law of miscalibration, toy edition

def scaling():
    """Base, OPD and CaOPD at each size of `sizes`, on the same held-out questions."""
    rows = []
    for size in sizes.split(","):
        n_layer, n_embd = map(int, size.split("x"))
        cfg, base, tok, base_name, (held, sample_train) = base_model(n_layer=n_layer, n_embd=n_embd,
                                                                     n_head=max(1, n_embd // 32))
        params = sum(p.numel() for p in base.parameters())
        for method in ("base",) + METHODS:
            model = base if method == "base" else trained(cfg, tok, base, base_name, method, sample_train)[0]
            m, _ = evaluate(cfg, tok, model, method, held)
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

def entropy_experiment():
    """The entropy log of the OPD (and CaOPD) run at the default size: per-token entropies on the
    completion tokens, every log_every steps (entropy_stats)."""
    cfg, base, tok, base_name, (held, sample_train) = base_model()
    logs = {method: trained(cfg, tok, base, base_name, method, sample_train)[2] for method in METHODS}
    cols = [(f"{who} {part}", f"{who}_{part}", "{:.3f}") for part in PARTS for who in WHO]
    at = (0, cfg.steps // 2 // cfg.log_every * cfg.log_every, (cfg.steps - 1) // cfg.log_every * cfg.log_every)
    rows = [{"method": method, "step": r["step"], **r} for method in METHODS for r in logs[method] if r["step"] in at]
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

@functools.lru_cache(maxsize=None)  # main builds them first, so a --ood_n the mixes cannot fill fails before training
def ood_sets(data_seed, n_eval):
    """name -> questions. "in_dist": the held-out questions of training's mix. "add4": additions
    with a 4-digit operand (training's have at most 3; the prompt is two tokens longer). "mul3":
    multiplications with a 3-digit operand (training's have at most 2; same prompt length).
    "sub": subtractions, an operation never trained (same prompt length)."""
    big = lambda ex, d: max(map(int, re.split(r"[-+*]", ex["id"]))) >= 10 ** (d - 1)
    sets = {"in_dist": questions.arith_task(data_seed, n_eval)[0]}
    for name, ops, digits, keep in (("add4", "+", 4, lambda ex: big(ex, 4)), ("mul3", "*", 3, lambda ex: big(ex, 3)),
                                    ("sub", "-", None, lambda ex: True)):
        drawn = questions.arith_task(data_seed, 4 * ood_n, ops, digits, f"--ood_n={ood_n} (4x drawn)")[0]
        held = [ex for ex in drawn if keep(ex)][:ood_n]
        if len(held) < ood_n:
            cli.die(f"--ood_n={ood_n}: only {len(held)} {name} questions; lower it")
        sets[name] = held
    return sets

def ood():
    cfg, base, tok, base_name, (held, sample_train) = base_model()
    models = {"base": base, **{m: trained(cfg, tok, base, base_name, m, sample_train)[0] for m in METHODS}}
    sets, rows, results = ood_sets(cfg.data_seed, cfg.n_eval), [], {}
    for method, model in models.items():
        for name, asked in sets.items():
            m, records = evaluate(cfg, tok, model, method, asked)
            rows.append({"set": name, "model": method, **m})
            results[f"{method} {name}"] = (m, records)
    rows.sort(key=lambda r: list(sets).index(r["set"]))
    print(table(rows, ["set", "model"]))
    report.reliability_diagram(results, os.path.join(OUT, "ood.png"), columns=len(sets))
    return {"rows": rows, "table": table(rows, ["set", "model"]),
            "examples": {name: [ex["question"] for ex in qs[:3]] for name, qs in sets.items()}}

# -----------------------------------------------------------------------------
# 4. continual learning: task A (addition), then task B (multiplication)

def continual():
    """OPD and CaOPD distilled on additions for --steps, then continued on
    multiplications; each phase starts a new frozen teacher (the student at its start).
    Evaluated after each phase on the additions and the multiplications of train_small.py's
    held-out questions (the multiplications have too few distinct held-out questions for n_eval of
    their own)."""
    cfg, base, tok, base_name, (held, _) = base_model()
    held_a, held_b = ([ex for ex in held if ex["kind"] == kind] for kind in ("add", "mul"))
    train_a, train_b = (arith.split(cfg.data_seed, 0, ops)[1] for ops in "+*")
    rows = []
    evaluate_both = lambda model, method, phase: [
        rows.append({"model": method, "after": phase, "eval on": name, **evaluate(cfg, tok, model, method, held)[0]})
        for name, held in (("A: add", held_a), ("B: mul", held_b))]
    evaluate_both(base, "base", "base")
    for method in METHODS:
        after_a, name_a, _ = trained(cfg, tok, base, base_name, method, train_a, data="+")
        evaluate_both(after_a, method, "A")
        after_b, _, _ = trained(cfg, tok, after_a, name_a, method, train_b, data="*")
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

def gradient_noise(cfg, tok, model, sample_train):
    """For the fixed model (its own frozen teacher), grad_batches independent CaOPD batches; on
    each, the gradient of every estimator on the same rollouts. Returns per estimator: the trace
    of the gradients' covariance across batches, the mean squared distance to the full-vocabulary
    gradient of the same batch, the mean cosine to it, and the cosine of the mean gradients."""
    net = ts.distiller(cfg, model)  # the student and a frozen copy, its teacher
    rng, grads = random.Random(cfg.seed + 2), {e: [] for e in ESTIMATORS}
    for b in range(grad_batches):
        exs = sample_train(rng, cfg.prompts_per_step)
        prompts, sampled = ts.rollouts(cfg, net, tok, exs, 1_000_000 + b, (0, cfg.prompts_per_step * cfg.K))
        texts = [tokenizer.decode(tok, r) for r in sampled]
        correct = [questions.verify_example(exs[i // cfg.K], t) for i, t in enumerate(texts)]
        completions, teacher_prompts, *_ = ts.targets(cfg, tok, "caopd", exs, sampled, texts, correct)
        for e, fn in ESTIMATORS.items():
            model.zero_grad(set_to_none=True)
            ts.kl_backward(cfg, net, prompts, completions, teacher_prompts, fn)
            grads[e].append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    G = {e: torch.stack(g) for e, g in grads.items()}  # (batches, parameters)
    cos = torch.nn.functional.cosine_similarity
    return {e: {"trace_cov": G[e].var(0).sum().item(), "mean_sq_norm": (G[e] ** 2).sum(1).mean().item(),
                "sq_dist_to_full": ((G[e] - G["full"]) ** 2).sum(1).mean().item(),
                "cos_to_full": cos(G[e], G["full"], dim=1).mean().item(),
                "cos_of_means": cos(G[e].mean(0), G["full"].mean(0), dim=0).item()} for e in ESTIMATORS}

def estimators():
    """CaOPD with each estimator from the same base; and the gradient noise of each at the base."""
    cfg, base, tok, base_name, (held, sample_train) = base_model()
    rows = []
    for e in ESTIMATORS:
        model = trained(cfg, tok, base, base_name, "caopd", sample_train, estimator=e)[0]
        rows.append({"estimator": e, **evaluate(cfg, tok, model, e, held)[0]})
    noise = gradient_noise(cfg, tok, base, sample_train)
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
    cfg, base, tok, base_name, (held, sample_train) = base_model()
    runs = [(int(k), False) for k in Ks.split(",") if k] + [(int(k), True) for k in smoothed_Ks.split(",") if k]
    rows = []
    for k, smooth in runs:
        run = ts.settings(**{**start(), **CLI, "K": k, "smooth_p_acc": smooth, "device": cfg.device,
                             "dtype": cfg.dtype})
        model = trained(run, tok, base, base_name, "caopd", sample_train)[0]
        rows.append({"K": k, "P_acc": "(c+1)/(K+2)" if smooth else "c/K", **evaluate(run, tok, model, "caopd", held)[0]})
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
# 7. which of CaOPD's three replacements carry the calibration

# (name, method, caopd_parts): a = the completion's stated confidence, b = the shown solution's
# confidence, c = the Note; OPD is CaOPD without any, CaOPD all three
VARIANTS = [("opd", "opd", "abc"), ("caopd", "caopd", "abc"), ("no a", "caopd", "bc"), ("no b", "caopd", "ac"),
            ("no c", "caopd", "ab"), ("a only", "caopd", "a"), ("b only", "caopd", "b"), ("c only", "caopd", "c")]

def replacements():
    """CaOPD with each replacement left out and with each alone, beside OPD and full CaOPD, from
    the same base per seed (seeds), at train_small.py's defaults; then each variant's metrics
    over the seeds (mean, and the spread between seeds)."""
    rows = []
    for seed in [int(s) for s in seeds.split(",") if s]:
        cfg, base, tok, base_name, (held, sample_train) = base_model(seed=seed)
        for name, method, parts in VARIANTS:
            run = ts.settings(**{**start(), **CLI, "seed": seed, "caopd_parts": parts, "device": cfg.device,
                                 "dtype": cfg.dtype})
            model = trained(run, tok, base, base_name, method, sample_train)[0]
            rows.append({"variant": name, "parts": parts if method == "caopd" else "-", "seed": seed,
                         **evaluate(run, tok, model, name, held)[0]})
    print(table(rows, ["variant", "parts", "seed"]))
    summary = []
    for name, _, _ in VARIANTS:
        runs = [r for r in rows if r["variant"] == name]
        mean = {key: sum(r[key] for r in runs) / len(runs) for _, key, _ in COLUMNS}
        spread = {f"{key}_range": max(r[key] for r in runs) - min(r[key] for r in runs) for _, key, _ in COLUMNS}
        summary.append({"variant": name, "parts": runs[0]["parts"], "seeds": len(runs), **mean, **spread})
    print(table(summary, ["variant", "parts", "seeds"]))
    plt, fig, axes = figure(3, size=3.8)
    x = range(len(summary))
    for ax, key in zip(axes[0], ("ece", "ocg", "auroc")):
        for seed in sorted({r["seed"] for r in rows}):
            ax.plot(x, [r[key] for r in rows if r["seed"] == seed], "o", label=f"seed {seed}")
        ax.set_xticks(list(x), [r["variant"] for r in summary], rotation=45, fontsize=8)
        ax.set(title=key)
    axes[0, 0].legend(fontsize=8)
    save(plt, fig, "replacements")
    return {"rows": rows, "summary": summary, "table": table(summary, ["variant", "parts", "seeds"])}

# -----------------------------------------------------------------------------
# 8. the baselines a reviewer asks for: OPD recalibrated after training, and self-consistency

CALIB_MIN = 200  # n_calib's least: fewer answers leave an isotonic map's steps mostly noise

@functools.lru_cache(maxsize=None)  # main draws them first: a bad n_calib or calib_seed fails before training
def calibration_questions(data_seed, n_eval, ops, digits):
    """n_calib questions to fit recalibration maps on: held out from training (arith.is_held, as the
    scored questions are: a map must learn the accuracy on questions the model never saw), drawn by
    a stream of their own (calib_seed), distinct, and none of the n_eval scored questions."""
    if n_calib < CALIB_MIN:
        cli.die(f"--n_calib={n_calib}: too few calibration questions to fit a map; at least {CALIB_MIN}")
    if calib_seed == data_seed:
        cli.die(f"--calib_seed={calib_seed}: draws the scored questions (--data_seed={data_seed}), "
                   f"so the calibration questions would be them; give it another value")
    scored = {ex["question"] for ex in questions.arith_task(data_seed, n_eval, ops, digits)[0]}
    rng, calib, draws = random.Random(calib_seed), {}, 0
    while len(calib) < n_calib:
        ex = arith.make_example(rng, ops, digits)
        if arith.is_held(data_seed, ex["id"]) and ex["question"] not in scored:
            calib.setdefault(ex["question"], ex)
        draws += 1
        if draws == 50 * n_calib:  # the default mix draws ~15 per question (a fifth held out, some scored)
            cli.die(f"--n_calib={n_calib}: {draws:,} draws found only {len(calib)} held-out questions "
                       f"that are not scored; ask for fewer")
    return list(calib.values())

def same_arith_answer(a, b):
    """Whether two completions give the same answer: the same integer after `Answer:` (before the
    confidence label), as caopd.verify_arith reads it; no answer agrees with nothing."""
    m, n = (caopd.ANSWER.search(caopd.split_confidence(t)[0]) for t in (a, b))
    return m is not None and n is not None and int(m.group(1)) == int(n.group(1))

def answers(cfg, tok, model, asked, copies=1, temperature=0.0, seed=0):
    """Completions (token lists) of `copies` answers to each question, greedy at temperature 0 (as
    train_small.evaluate answers) or sampled with the rollouts' top_k; question i's are rows
    i * copies .. (i + 1) * copies - 1. eval_batch rows a call, one generator seeded with seed."""
    prompts = [tokenizer.student_tokens(tok, ex, cfg.enable_thinking) for ex in asked for _ in range(copies)]
    rows, out, end = cfg.eval_batch or memory.EVAL_CAP, [], tokenizer.end_id(tok)
    gen = torch.Generator(cfg.device).manual_seed(seed)
    for a in range(0, len(prompts), rows):
        with cli.autocast(cfg):
            out += caopd.sample(model, prompts[a:a + rows], cfg.max_new_tokens, end, temperature, cfg.top_k,
                                gen, decoder=models.seams(model, models.captures(cfg))["decoder"])
    return out

def scored_answers(tok, asked, completions):
    """An evaluation record per question (train_small.evaluate's verdict and stated confidence) and
    the number of tokens its completion took."""
    texts = [tokenizer.decode(tok, c) for c in completions]
    return [{"id": ex["id"], "correct": questions.verify_example(ex, text),
             "confidence": caopd.parse_confidence(text), "tokens": len(c)}
            for ex, text, c in zip(asked, texts, completions)]

def interval_cell(d, signed=False):
    """A summarize() number as "value [low, high]"."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"

def self_consistency(cfg, tok, model, asked, greedy):
    """(confidence, sampled tokens) per question: K samples at the rollouts' temperature (seeded with
    the run's seed), the share of them that give the greedy answer."""
    sampled = answers(cfg, tok, model, asked, cfg.K, cfg.temperature, seed=cfg.seed)
    texts = [tokenizer.decode(tok, c) for c in sampled]
    per_question = [texts[i * cfg.K:(i + 1) * cfg.K] for i in range(len(asked))]
    agree = calibration.self_consistency_confidence([tokenizer.decode(tok, c) for c in greedy], per_question,
                                                    same_arith_answer)
    return agree, sum(map(len, sampled)) / len(asked)

def baselines():
    """Base, OPD and CaOPD from one base, each with the confidence it states, and for the base and
    OPD self-consistency (K samples per question at the rollouts' temperature; its confidence: the
    share agreeing with the greedy answer); each also recalibrated (Platt scaling and isotonic
    regression fitted on n_calib other questions). Every row of a model scores its greedy answers,
    so the rows of one model differ only in their confidences. ECE, Brier, AUROC, AURC with 95%
    intervals (a bootstrap over the scored questions), tokens per question, paired differences."""
    cfg, base, tok, base_name, (held, sample_train) = base_model()
    calib = calibration_questions(cfg.data_seed, cfg.n_eval, cfg.arith_ops, cfg.arith_digits or None)
    models = {"base": base, **{m: trained(cfg, tok, base, base_name, m, sample_train)[0] for m in METHODS}}
    results, model_of, tokens, maps, calib_accuracy = {}, {}, {}, {}, {}
    sc = f"SC-{cfg.K}"
    for name, model in models.items():
        t0 = time.time()
        greedy, calib_greedy = answers(cfg, tok, model, held), answers(cfg, tok, model, calib)
        scored, fitting = scored_answers(tok, held, greedy), scored_answers(tok, calib, calib_greedy)
        fit_correct, fit_stated = calibration.verdicts(fitting)
        calib_accuracy[name] = sum(fit_correct) / len(fit_correct)
        one = sum(r["tokens"] for r in scored) / len(scored)  # one greedy answer's tokens
        # row -> (confidence per scored answer, the same on the calibration questions, tokens per question)
        sources = {name: (calibration.verdicts(scored)[1], fit_stated, one)}
        if name != "caopd":  # self-consistency: the test-time measurement that CaOPD's stated value replaces
            agree, cost = self_consistency(cfg, tok, model, held, greedy)
            fit_agree = self_consistency(cfg, tok, model, calib, calib_greedy)[0]
            sources[f"{name} {sc}"] = (agree, fit_agree, one + cost)
        for row, (confidence, fit_confidence, cost) in sources.items():
            rows = {row: confidence}
            for how, fitter in (("Platt", calibration.platt), ("isotonic", calibration.isotonic)):
                mapped = fitter(fit_correct, fit_confidence)  # fitted on the calibration questions alone
                rows[f"{row} {how}"] = mapped(confidence).tolist()
                maps[f"{row} {how}"] = {f"{v / 10:.1f}": round(mapped([v / 10]).item(), 4) for v in range(11)}
            for r, conf in rows.items():
                results[r] = (None, [{**record, "confidence": c} for record, c in zip(scored, conf)])
                model_of[r], tokens[r] = name, cost
        print(f"{name}: answered, fitted and sampled in {time.time() - t0:.0f}s")
    pairs = [("caopd", other) for other in ("base", f"base {sc} isotonic", "opd", "opd Platt", "opd isotonic",
                                            f"opd {sc}", f"opd {sc} isotonic")]
    pairs += [("caopd isotonic", "opd isotonic"), ("caopd isotonic", f"opd {sc} isotonic")]
    summary = calibration.summarize(results, n_resamples, 0, pairs)
    keys = {"acc": "accuracy", "ECE": "ece", "Brier": "brier", "AUROC": "auroc", "AURC": "aurc",
            "acc at 50%": "accuracy_at_50"}
    rows = [{"model": model_of[row], "confidence": row[len(model_of[row]) + 1:] or "stated",
             **{h: interval_cell(summary["models"][row][k]) for h, k in keys.items()},
             "tokens / question": f"{tokens[row]:.1f}",
             "x greedy": f"{tokens[row] / tokens[model_of[row]]:.1f}"}
            for row in results]
    differences = [{"difference": name, **{h: interval_cell(d[k], signed=True) for h, k in keys.items()}}
                   for name, d in summary["differences"].items()]
    text = (table(rows, ["model", "confidence", *keys, "tokens / question", "x greedy"], [])
            + f"\n\npaired differences on the same {n_resamples:,} resamples (95% intervals)\n"
            + table(differences, ["difference", *keys], []))
    print(text)
    baselines_figure(results, model_of)
    mul = lambda questions: sum(ex["kind"] == "mul" for ex in questions) / len(questions)
    return {"summary": summary, "tokens_per_question": tokens, "maps": maps, "table": text,
            "calibration_questions": {"n": len(calib), "seed": calib_seed, "multiplications": mul(calib),
                                      "accuracy": calib_accuracy},
            "scored_questions": {"n": len(held), "multiplications": mul(held)}}

def baselines_figure(results, model_of):
    """A column per model: a reliability diagram of each of its confidences, then their risk against
    coverage."""
    columns = [[row for row in results if model_of[row] == m] for m in dict.fromkeys(model_of.values())]
    plt, fig, axes = figure(len(columns), max(map(len, columns)) + 1, size=3.2)
    for col, rows in enumerate(columns):
        for i, ax in enumerate(axes[:-1, col]):
            if i >= len(rows):
                ax.axis("off")
                continue
            correct, confidence = calibration.verdicts(results[rows[i]][1])
            m = caopd.calibration_metrics(correct, confidence)
            calibration.reliability_panel(ax, correct, confidence,
                                          f"{rows[i]}: ECE {m['ece']:.3f}, AUROC {m['auroc']:.2f}")
        curves = {row: calibration.verdicts(results[row][1]) for row in rows}
        calibration.risk_coverage_panel(axes[-1, col], curves, f"{rows[0]}: risk against coverage")
    save(plt, fig, "baselines")

# -----------------------------------------------------------------------------

EXPERIMENTS = {"scaling": scaling, "entropy": entropy_experiment, "ood": ood, "continual": continual,
               "estimators": estimators, "pacc": pacc, "replacements": replacements,
               "baselines": baselines}

def show_help():
    cli.print_help(OWN, f"python experiments.py {{{','.join(EXPERIMENTS)},all}} [--key=value ...]",
                      "\n\n".join(__doc__.strip().split("\n\n")[:2]),
                      also=(f"train_small.py's settings, which every experiment starts from, with TRAIN = {TRAIN} "
                            "instead of its defaults:", {k: v for k, v in ts.SETTINGS.items() if k not in OWN}))

def main(argv):
    global OUT
    if argv and argv[0] in ("--help", "-h"):
        show_help()
        sys.exit(0)
    if not argv or argv[0] not in (*EXPERIMENTS, "all"):
        cli.die(f"the first argument names the experiment: {', '.join(EXPERIMENTS)} or all (--help lists the settings)")
    names = list(EXPERIMENTS) if argv[0] == "all" else [argv[0]]
    given = cli.parse_overrides(argv[1:], {**OWN, **ts.SETTINGS}, show_help)
    for key in set(given) & set(OWN):
        globals()[key] = given.pop(key)
    if given.get("init_from", "scratch") != "scratch" or given.get("task", "arith") != "arith":
        cli.die("the experiments run on the toy task: --init_from=scratch --task=arith")
    CLI.update(given)
    cfg = ts.settings(**{**start(), **CLI})  # check the command line before anything runs
    if "ood" in names:
        ood_sets(cfg.data_seed, cfg.n_eval)
    if "baselines" in names:
        calibration_questions(cfg.data_seed, cfg.n_eval, cfg.arith_ops, cfg.arith_digits or None)
    os.makedirs(cache_dir, exist_ok=True)
    for name in names:
        t0 = time.time()
        OUT = CLI["out_dir"] = out_dir or os.path.join("out", "experiments", name)  # checkpoints go there too
        run_dir.take_out_dir(OUT)
        print(f"\n=== {name} -> {OUT}")
        write(name, EXPERIMENTS[name](), t0)
        run_dir.release_out_dir()

if __name__ == "__main__":
    main(sys.argv[1:])
