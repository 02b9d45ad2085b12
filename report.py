"""
What a finished run shows: the table and a few answers of each model, the reliability diagram and
the training curves (curves.py draws them for any runs).
"""
import json
import math
import os

import torch
from tqdm import tqdm

import calibration
import caopd
import metrics_log
import models
import run_dir
import tokenizer
from parallel import WORLD

def score(cfg, name, records):
    """The metrics of one model's held-out records (caopd.calibration_metrics), with the share of
    answers that state a confidence (format_rate) and that state one outside [0, 1] (clipped_rate).
    An answer without a confidence counts as 0: on a wrong answer that looks calibrated, so a model
    that mostly states none has an ECE (and SPR, AUROC, Brier) that says nothing: it is warned."""
    stated = [r["confidence"] or 0.0 for r in records]
    metrics = caopd.calibration_metrics([r["correct"] for r in records], stated)
    metrics["format_rate"] = sum(r["confidence"] is not None for r in records) / len(records)
    raw = [caopd.parse_confidence(r["completion"], clip=False) for r in records]
    metrics["clipped_rate"] = sum(c is not None and not 0 <= c <= 1 for c in raw) / len(records)
    metrics["format_ok"] = metrics["format_rate"] >= 0.5
    if not metrics["format_ok"]:
        tqdm.write(f"warning: {name}: only {metrics['format_rate']:.0%} of its answers state a confidence "
                   f"(format rate < 0.5): its ECE and the other calibration metrics are not meaningful")
    if cfg.task == "tooluse":  # the same stated confidences against the all-calls verdicts
        metrics["all_calls"] = caopd.calibration_metrics([r["correct_all_calls"] for r in records], stated)
    # selective prediction and how sure each number is: 95% bootstrap intervals over the questions
    summary = calibration.summarize({name: (metrics, records)}, RESAMPLES, seed=0)["models"][name]
    metrics.update({k: v["value"] for k, v in summary.items() if k.startswith("accuracy_at_")})
    metrics["ci95"] = {k: [v["low"], v["high"]] for k, v in summary.items()}
    return metrics

RESAMPLES = 1000  # bootstrap resamples of the held-out questions behind every interval (seeded: 0)
SHOWN = ("accuracy", "ece", "brier", "auroc", "aurc", "accuracy_at_50", "accuracy_at_80")  # with intervals

def describe_run(cfg, model, tok, held, smoke):
    """The lines a run prints before it trains: what it is, where, and how large."""
    if cfg.enable_thinking != "default" and not tokenizer.template_reads(tok, "enable_thinking"):
        why = "the toy has no chat template" if cfg.init_from == "scratch" else "its chat template never reads it"
        print(f"--enable_thinking={cfg.enable_thinking!r} ignored: {why}")
    if cfg.smoke:
        shrunk = ", ".join(f"{k}={getattr(cfg, k)}" for k in smoke)
        print(f"smoke run: every stage shrunk to seconds ({shrunk}); it checks the machinery, its numbers "
              f"mean nothing")
    print(f"device {cfg.device}, {cfg.dtype} compute, {WORLD} process(es), {cfg.threads} thread(s), "
          f"decode step {'compiled' if models.captures(cfg) else 'eager'}, "
          f"vocabulary {caopd.output_weight(model).shape[0]} tokens, {len(held)} held-out questions, model "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

def write(cfg, results, skipped, seconds, finish):
    """The end of a run (rank 0): the table and a few answers, then out_dir/completions.jsonl,
    reliability.png, curves.png, results.json; finish(images) closes the training log."""
    summary = calibration.summarize(results, RESAMPLES, seed=0)  # the paired CaOPD - OPD difference too
    report(results, summary)
    run_dir.write_atomic(os.path.join(cfg.out_dir, "completions.jsonl"),
                         "".join(json.dumps(r) + "\n" for _, records in results.values() for r in records))
    images = {name: os.path.join(cfg.out_dir, f"{name}.png") for name in ("reliability", "curves")}
    reliability_diagram(results, images["reliability"], selective=True)
    training_curves([(cfg.out_dir, metrics_log.read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl")))],
                    images["curves"])
    run_dir.write_json(os.path.join(cfg.out_dir, "results.json"),
                       {"config": vars(cfg), "models": {n: m for n, (m, _) in results.items()},
                        "differences": summary["differences"], "skipped_updates": skipped, "seconds": seconds})
    finish(images)
    print(f"\nwrote {cfg.out_dir}/results.json, reliability.png, curves.png, completions.jsonl, "
          f"metrics.jsonl in {seconds['total']:.0f}s")

def ece_floor(confidence, reps=200):
    """ECE from sampling alone: (mean, sd) over reps draws of a perfectly calibrated model that
    states these confidences, each answer right with the probability it states. An ECE near this
    is as good as the number of questions can tell."""
    c = torch.as_tensor(confidence, dtype=torch.float64)
    y = torch.rand(reps, len(c), generator=torch.Generator().manual_seed(0), dtype=torch.float64) < c  # (reps, n)
    per_bin = torch.zeros(reps, 10, dtype=torch.float64).index_add_(1, caopd.confidence_bin(c), c - y.double())
    ece = per_bin.abs().sum(1) / len(c)  # sum over bins of share x |mean conf - acc| = |sum(conf - correct)| / n
    return ece.mean().item(), ece.std().item()

def report(results, summary=None):
    """The table (tool use: a second one, every golden call checked), the intervals of summary
    (calibration.summarize) and two right and two wrong answers of each model."""
    tables = [("", None)]  # (title, key of the metrics it shows: None = the top level)
    if any("all_calls" in m for m, _ in results.values()):
        tables.append(("\nevery golden call checked (the authors' eval_tooluse.py); above, the first call (training's P_acc)",
                       "all_calls"))
    for title, key in tables:
        print(f"{title}\n{'model':6s} {'acc':>6s} {'conf':>6s} {'ECE':>6s} {'Brier':>6s} {'OCG':>7s} {'SPR':>6s} {'AUROC':>6s} "
              f"{'AURC':>6s} {'format':>6s}  ECE of a calibrated model with these confidences")
        for name, (metrics, records) in results.items():
            m = metrics[key] if key else metrics
            floor = ece_floor([r["confidence"] or 0.0 for r in records])
            print(f"{name:6s} {m['accuracy']:6.3f} {m['mean_confidence']:6.3f} {m['ece']:6.3f} {m['brier']:6.3f} "
                  f"{m['ocg']:+7.3f} {m['spr']:6.3f} {m['auroc']:6.3f} {m['aurc']:6.3f} {metrics['format_rate']:6.3f}  "
                  f"{floor[0]:.3f} +- {floor[1]:.3f}")
    if summary:
        shown = {part: {name: {k: d[k] for k in SHOWN} for name, d in summary[part].items()}
                 for part in ("models", "differences")}
        print("\n" + calibration.format_table({**summary, **shown}))
    for name, (_, records) in results.items():
        right = [r for r in records if r["correct"]][:2]
        wrong = [r for r in records if not r["correct"]][:2]
        for r in right + wrong:
            print(f"  {name:5s} {'right' if r['correct'] else 'wrong'}  {r['id']} = {str(r['answer'])[:40]:<5s} -> "
                  + r["completion"].replace("\n", " | ")[:300])

def reliability_diagram(results, path, columns=None, selective=False):
    """Accuracy per confidence bin for each model, bin counts written on the bars; panels in rows
    of `columns` (default: one row). results: {name: (metrics, records)}. selective: a last panel,
    every model's risk against coverage (answering the most confident first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = len(results) + selective
    cols = columns or panels
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.axis("off")
    if selective:
        calibration.risk_coverage_panel(axes.flat[len(results)], {name: calibration.verdicts(records) for name,
                                        (_, records) in results.items()}, "selective prediction")
    for ax, (name, (m, records)) in zip(axes.flat, results.items()):
        calibration.reliability_panel(ax, *calibration.verdicts(records), f"{name}: acc {m['accuracy']:.2f}, "
                                      f"conf {m['mean_confidence']:.2f}, ECE {m['ece']:.3f}")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)

NAMES = {"opd": "OPD", "caopd": "CaOPD"}

def training_curves(runs, path):
    """The illusion forming, from metrics.jsonl records: runs is [(title, records)], one column
    each. A row per method: the stated confidence against the rollouts' accuracy and their mean
    P_acc over the steps (the shaded gap is the overconfidence); a last row: each method's held-out
    ECE where it was evaluated, the base's at step 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in ("opd", "caopd") if any(r["stage"] == m for _, records in runs for r in records)]
    fig, axes = plt.subplots(len(methods) + 1, len(runs), figsize=(5.5 * len(runs), 3.2 * (len(methods) + 1)),
                             squeeze=False)
    for col, (title, records) in enumerate(runs):
        for ax, m in zip(axes[:-1, col], methods):
            train = [r for r in records if r["kind"] == "train" and r["stage"] == m]
            steps = [r["step"] for r in train]
            stated, acc = [r["stated_confidence"] for r in train], [r["rollout_accuracy"] for r in train]
            ax.plot(steps, stated, color="tab:red", label="stated confidence")
            ax.plot(steps, acc, color="tab:blue", label="rollout accuracy")
            ax.plot(steps, [r["p_acc"] for r in train], ":", color="black", label="mean P_acc")
            ax.fill_between(steps, acc, stated, color="tab:red", alpha=0.12)
            ax.set(ylim=(0, 1.05), xlabel="step", ylabel="mean over the step's rollouts",
                   title=f"{title}: {NAMES[m]}")
            ax.legend(fontsize=7)
        ax = axes[-1, col]
        base = [r["ece"] for r in records if r["kind"] == "eval" and r["stage"] == "base"]
        for m, color in zip(methods, ("tab:orange", "tab:purple")):
            # by step: the last evaluation during the stage and the final one are the same model
            at = {r["step"]: r["ece"] for r in records if r["kind"] == "eval" and r["stage"] == m}
            if base:
                at = {0: base[-1], **at}
            if at:
                ax.plot(list(at), list(at.values()), "o-", color=color, label=NAMES[m])
        ax.set(ylim=(0, None), xlabel="step", ylabel="held-out ECE",
               title=f"{title}: held-out ECE (the base's at 0)")
        if methods:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
