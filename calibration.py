"""
Calibration a researcher can trust: intervals, selective prediction, recalibration.

caopd.calibration_metrics gives one number per metric. Here is what a reader needs to trust them:

    risk_coverage, accuracy_at_coverage   selective prediction: answer the most confident first
    metrics_of_resamples, summarize        every metric for many bootstrap resamples at once, and its
                                           95% interval; the paired difference of two models on the
                                           same resamples of the same questions
    format_table                           summarize's numbers as a readable table
    platt, isotonic                        post-hoc recalibration maps, fitted on other questions
    self_consistency_confidence            the test-time alternative: agreement of K samples
    reliability_panel, risk_coverage_panel one model's plots, on a matplotlib axis

Inputs are plain: a model's verdicts (0/1 or bool per question) and stated confidences (floats in
[0, 1]; None, an answer without one, counts as 0, as in the metrics). Everything is float64.
Ties in confidence are common (the toy states 0.0, 0.1, ..., 1.0), so every ranking quantity
takes the expectation over the orders of tied answers, in closed form.
"""
import torch
import torch.nn.functional as F

import caopd

METRICS = ("accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc")  # caopd's metrics
COVERAGES = (0.5, 0.8)  # the coverages whose accuracy summarize reports
LEVEL = 0.95  # of every interval

def _tensors(correct, confidence):
    """(verdicts, confidences) as float64 tensors, None read as 0."""
    y = torch.as_tensor([float(v) for v in correct], dtype=torch.float64)
    c = torch.as_tensor([0.0 if v is None else float(v) for v in confidence], dtype=torch.float64)
    assert len(y) == len(c) > 0, "needs equally long, non-empty verdicts and confidences"
    return y, c

def verdicts(records):
    """(correct, confidence) lists of evaluation records (dicts with "correct" and "confidence")."""
    return [r["correct"] for r in records], [r["confidence"] or 0.0 for r in records]

# -----------------------------------------------------------------------------
# selective prediction: answer the most confident questions, abstain on the rest

def _expected_errors(y, c):
    """Per place k = 1..n, in the order from the most confident answer down, the expected number
    of errors among the first k. Within a group of tied answers every order is equally likely, so
    each place of the group is wrong with the group's error rate: give every answer that rate."""
    conf, order = c.sort(descending=True)
    _, group, size = conf.unique_consecutive(return_inverse=True, return_counts=True)
    group_err = torch.zeros(len(size), dtype=torch.float64).index_add_(0, group, 1 - y[order]) / size
    return group_err[group].cumsum(0)

def risk_coverage(correct, confidence):
    """(coverage, risk), each (n,): answering the k most confident questions (coverage k / n) has
    the error rate risk[k - 1], averaged over the orders of tied answers. Its mean is AURC."""
    y, c = _tensors(correct, confidence)
    k = torch.arange(1, len(y) + 1, dtype=torch.float64)
    return k / len(y), _expected_errors(y, c) / k

def accuracy_at_coverage(correct, confidence, coverage):
    """The expected accuracy of the answers to the most confident `coverage` share of the questions.
    coverage * n answers need not be whole, and the boundary may cut a tie group: the answers are
    taken as mass 1/n each, in order, the boundary answer in part; a cut tie group gives each of
    its answers its error rate (the expectation over its orders)."""
    y, c = _tensors(correct, confidence)
    assert 0 < coverage <= 1, "a coverage in (0, 1]"
    m = coverage * len(y)  # answers taken
    errors = torch.cat([torch.zeros(1, dtype=torch.float64), _expected_errors(y, c)])  # after 0..n answers
    whole = min(int(m), len(y) - 1)
    return 1 - (errors[whole] + (m - whole) * (errors[whole + 1] - errors[whole])).item() / m

# -----------------------------------------------------------------------------
# bootstrap: every metric for many resamples of the questions at once

def resample_counts(n, n_resamples, seed):
    """(n_resamples, n): how many times each of n questions is drawn in each bootstrap resample
    (n draws with replacement), from a generator seeded with seed."""
    idx = torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(n_resamples, n, dtype=torch.float64)
    return torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(1, idx, ones)

def metrics_of_resamples(correct, confidence, counts, coverages=COVERAGES):
    """Every metric of caopd.calibration_metrics (METRICS), and the accuracy at each coverage
    ("accuracy_at_50", ...), for each row of counts (R, n): row r holds question i counts[r, i]
    times (a bootstrap resample; a row of ones: the questions themselves). Returns name -> (R,).
    No (n x n) pair matrix and no per-row sort: every ranking quantity is a sum over the distinct
    confidence values (sorted once), so R x n work for any R. Counts must be whole numbers."""
    y, c = _tensors(correct, confidence)
    W = torch.as_tensor(counts, dtype=torch.float64)
    R, n = W.shape[0], W.sum(1)  # each row's number of answers
    out = {"accuracy": W @ y / n, "mean_confidence": W @ c / n, "brier": W @ (c - y) ** 2 / n}
    out["ocg"] = out["mean_confidence"] - out["accuracy"]
    # ECE: the share of each bin times |its mean confidence - its accuracy| = |sum over it of (c - y)| / n
    per_bin = torch.zeros(R, 10, dtype=torch.float64).index_add_(1, caopd.confidence_bin(c), W * (c - y))
    out["ece"] = per_bin.abs().sum(1) / n
    # the answers grouped by confidence value, from the least confident up: (R, groups) counts
    _, group = c.unique(return_inverse=True)
    groups = int(group.max()) + 1
    size = torch.zeros(R, groups, dtype=torch.float64).index_add_(1, group, W)
    right = torch.zeros(R, groups, dtype=torch.float64).index_add_(1, group, W * y)
    wrong = size - right
    # SPR, AUROC: (correct, incorrect) pairs where the correct one is more confident, and ties
    pairs = right.sum(1) * wrong.sum(1)
    wins = (right * (wrong.cumsum(1) - wrong)).sum(1)  # each correct answer x the wrong ones below its group
    ties = (right * wrong).sum(1)
    ranked = pairs > 0  # both classes present; else SPR is 0 and AUROC 0.5, as in calibration_metrics
    out["spr"] = torch.where(ranked, wins / pairs.clamp(min=1), 0.0)
    out["auroc"] = torch.where(ranked, (wins + ties / 2) / pairs.clamp(min=1), 0.5)
    # selective prediction, from the most confident group down: a group of s answers after N others and E
    # expected errors fills places N + 1 .. N + s, place N + j with E + j e / s expected errors (e: its own);
    # the sum over its places of errors / place is e + (E - e N / s)(H(N + s) - H(N)), H the harmonic numbers
    size, wrong = size.flip(1), wrong.flip(1)
    before, wrong_before = size.cumsum(1) - size, wrong.cumsum(1) - wrong
    rate = wrong / size.clamp(min=1)  # 0 for a group this resample does not draw
    H = torch.cat([torch.zeros(1, dtype=torch.float64),
                   (1 / torch.arange(1, int(n.max()) + 1, dtype=torch.float64)).cumsum(0)])
    at = lambda k: H[k.round().long()]
    out["aurc"] = (wrong + (wrong_before - rate * before) * (at(before + size) - at(before))).sum(1) / n
    for q in coverages:  # the group the boundary falls in: the first whose end reaches q n answers
        m = q * n
        g = torch.searchsorted(size.cumsum(1), m[:, None]).clamp(max=groups - 1)  # (R, 1)
        errors = wrong_before.gather(1, g)[:, 0] + (m - before.gather(1, g)[:, 0]) * rate.gather(1, g)[:, 0]
        out[f"accuracy_at_{round(q * 100)}"] = 1 - errors / m
    return {k: out[k] for k in (*METRICS, *(f"accuracy_at_{round(q * 100)}" for q in coverages))}

def interval(samples, level=LEVEL):
    """(low, high): the percentile interval of samples (R,) that holds `level` of them."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(samples, q).tolist()
    return low, high

def summarize(results, n_resamples=1000, seed=0, pairs=(("caopd", "opd"),), coverages=COVERAGES):
    """Intervals for results = {name: (metrics, records)} (records: dicts with "correct" and
    "confidence", the same questions in the same order for every model): per model every metric of
    metrics_of_resamples as {"value", "low", "high"} (value: on the questions themselves, low / high:
    the 95% percentile interval of n_resamples bootstrap resamples of the questions, seeded with
    seed); and for each pair (a, b) of pairs whose models are both there, the paired difference
    a - b, both models on the same resamples. Plain dicts of floats, ready for JSON."""
    names = list(results)
    ids = {name: [r.get("id") for r in records] for name, (_, records) in results.items()}
    if len({tuple(v) for v in ids.values()}) > 1:
        raise ValueError(f"summarize: the models {names} did not answer the same questions in one order")
    n = len(next(iter(ids.values())))
    counts = resample_counts(n, n_resamples, seed)
    ones = torch.ones(1, n, dtype=torch.float64)
    point, resampled = {}, {}
    for name, (_, records) in results.items():
        correct, confidence = verdicts(records)
        point[name] = {k: v.item() for k, v in
                       metrics_of_resamples(correct, confidence, ones, coverages).items()}
        resampled[name] = metrics_of_resamples(correct, confidence, counts, coverages)

    def described(values, samples):
        return {k: {"value": values[k], **dict(zip(("low", "high"), interval(samples[k])))} for k in values}
    out = {"n": n, "n_resamples": n_resamples, "seed": seed, "level": LEVEL,
           "interval": "percentile bootstrap over the questions",
           "models": {name: described(point[name], resampled[name]) for name in names}, "differences": {}}
    for a, b in pairs:
        if a in results and b in results:
            difference = lambda d: {k: d[a][k] - d[b][k] for k in point[a]}
            out["differences"][f"{a} - {b}"] = described(difference(point), difference(resampled))
    return out

LABELS = {"accuracy": "accuracy", "mean_confidence": "mean confidence", "ece": "ECE", "brier": "Brier",
          "ocg": "OCG", "spr": "SPR", "auroc": "AUROC", "aurc": "AURC"}

def format_table(summary, columns=None):
    """summarize's numbers as a table: a row per metric, a column per model and per difference
    (columns: the names to show, default all), each cell the value and its [low, high]."""
    cols = {**summary["models"], **summary["differences"]}
    cols = {k: cols[k] for k in (columns or cols)}
    keys = list(next(iter(cols.values())))
    signed = lambda name, k: " - " in name or k == "ocg"  # a difference or a gap: its sign matters

    def cell(d, sign):
        f = "{:+.3f}" if sign else "{:.3f}"
        return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"
    cells = [[LABELS.get(k) or f"acc at {k.rsplit('_', 1)[1]}% coverage" for k in keys]]
    cells += [[cell(d[k], signed(name, k)) for k in keys] for name, d in cols.items()]
    rows = [["", *cols], *zip(*cells)]  # the header, then a row per metric
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = [f"{summary['level']:.0%} intervals: {summary['interval']}, {summary['n_resamples']:,} "
             f"resamples of the {summary['n']:,} questions (seed {summary['seed']}); differences paired"]
    lines += ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# post-hoc recalibration: a map of stated confidences, fitted on questions that are not scored

def _logit(c, eps):
    return torch.logit(c.clamp(eps, 1 - eps))

def platt(correct, confidence, eps=1e-3, steps=100):
    """Platt scaling: the map c -> sigmoid(a logit(c) + b) that fits the verdicts best (logistic
    regression on logit(c), 0 and 1 clamped to eps and 1 - eps), by Newton steps from the identity
    (a = 1, b = 0). Returns the map: confidences (a list or tensor) -> a float64 tensor.
    A tiny ridge on a makes the fit unique where the confidences carry no ranking: a model that
    states one value everywhere gets a = 0 and b = logit(its accuracy here), one number for all."""
    y, c = _tensors(correct, confidence)
    X = torch.stack([_logit(c, eps), torch.ones_like(c)], 1)  # (n, 2)
    ridge = torch.tensor([1e-6 * len(y), 0.0], dtype=torch.float64)
    loss = lambda w: (F.binary_cross_entropy_with_logits(X @ w, y, reduction="sum")
                      + 0.5 * (ridge * w * w).sum())
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge * w
        if grad.abs().max() < 1e-9 * len(y):  # the optimum, to float64's reach
            break
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + torch.diag(ridge)
        # pinv: where every answer is right (or wrong), b runs off to +-inf and p (1 - p) underflows to 0
        step, t, now = torch.linalg.pinv(hessian) @ grad, 1.0, loss(w)
        while loss(w - t * step) > now and t > 1e-6:  # halve where a full Newton step overshoots
            t /= 2
        w = w - t * step
    a, b = w.tolist()
    return lambda conf: torch.sigmoid(a * _logit(torch.as_tensor(conf, dtype=torch.float64), eps) + b)

def isotonic(correct, confidence):
    """Isotonic regression: the non-decreasing map of confidence to accuracy that fits the verdicts
    best in squared error (pool adjacent violators), tied confidences pooled first (one value each).
    Between the fitted confidences it interpolates linearly, beyond them it is flat. Returns the
    map: confidences (a list or tensor) -> a float64 tensor."""
    y, c = _tensors(correct, confidence)
    xs, group = c.unique(return_inverse=True)
    size = torch.zeros(len(xs), dtype=torch.float64).index_add_(0, group, torch.ones_like(y))
    right = torch.zeros(len(xs), dtype=torch.float64).index_add_(0, group, y)
    blocks = []  # [correct, answers, distinct confidences] of each pooled block, in order
    for r, s in zip(right.tolist(), size.tolist()):
        blocks.append([r, s, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            r2, s2, k2 = blocks.pop()
            blocks[-1] = [blocks[-1][0] + r2, blocks[-1][1] + s2, blocks[-1][2] + k2]
    fitted = torch.tensor([r / s for r, s, k in blocks for _ in range(k)], dtype=torch.float64)

    def mapped(conf):
        x = torch.as_tensor(conf, dtype=torch.float64)
        if len(xs) == 1:
            return torch.full_like(x, fitted[0].item())
        i = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)  # xs[i - 1] <= x <= xs[i] inside the range
        t = ((x - xs[i - 1]) / (xs[i] - xs[i - 1])).clamp(0, 1)
        return fitted[i - 1] + t * (fitted[i] - fitted[i - 1])
    return mapped

def self_consistency_confidence(greedy_texts, sampled_texts_per_question, same_answer):
    """Test-time confidence without a stated one: per question, the share of its K sampled answers
    that give the greedy answer (same_answer(greedy_text, sampled_text) -> bool: the task's
    verified-equal). The greedy answer is the one scored; the K samples only measure its support."""
    return [sum(bool(same_answer(g, s)) for s in samples) / len(samples)
            for g, samples in zip(greedy_texts, sampled_texts_per_question)]

# -----------------------------------------------------------------------------
# plots: one model on a matplotlib axis

def reliability_panel(ax, correct, confidence, title=""):
    """Accuracy per confidence bin (the bins of ECE), the number of answers written on each bar."""
    y, c = _tensors(correct, confidence)
    bins = caopd.confidence_bin(c)
    for b in range(10):
        sel = bins == b
        if sel.any():
            acc = y[sel].mean().item()
            ax.bar(b / 10 + 0.05, acc, width=0.09, color="tab:blue", edgecolor="black")
            ax.text(b / 10 + 0.05, acc + 0.02, str(int(sel.sum())), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="stated confidence", ylabel="accuracy")
    ax.set_title(title, fontsize=9)

def risk_coverage_panel(ax, curves, title=""):
    """Risk against coverage of each entry of curves = {label: (correct, confidence)}, with the
    best order of the first entry's answers (every right one first) and its error rate when it
    answers everything (any order that ignores confidence). Entries of one model's answers with
    different confidences (raw, recalibrated, self-consistency) share those two lines."""
    for label, (correct, confidence) in curves.items():
        coverage, risk = risk_coverage(correct, confidence)
        ax.plot(coverage.tolist(), risk.tolist(), label=f"{label}: AURC {risk.mean().item():.3f}")
    y, _ = _tensors(*next(iter(curves.values())))
    coverage, best = risk_coverage(y, y)  # the right answers most confident: the least risk there is
    ax.plot(coverage.tolist(), best.tolist(), ":", color="black",
            label=f"best order: {best.mean().item():.3f}")
    ax.axhline(1 - y.mean().item(), color="gray", linestyle="--", label="no ranking")
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (most confident answered first)",
           ylabel="error rate of the answered")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
