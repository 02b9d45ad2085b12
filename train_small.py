"""
Watch on-policy distillation become overconfident, and CaOPD stay calibrated, on a laptop.

Stage 0 trains a small GPT from scratch on a toy arithmetic task (the "base" model, toy_base.py).
Stage 1 distills it on-policy toward a teacher that sees a worked demonstration: once as plain
OPD, once as CaOPD, from the same base with the same seed. Then all three answer the same
held-out questions (greedy) and we compare accuracy and calibration.

    python train_small.py                          # everything, a few minutes on a laptop CPU
    python train_small.py --help                   # every setting, its default and what it does
    python train_small.py --method=caopd --seed=1  # one method, another seed
    python train_small.py --smoke=True             # the whole pipeline in seconds (machinery only)
    python train_small.py ... --init_from=resume   # continue an interrupted run: the same command + this
    python train_small.py --init_from=Qwen/Qwen3-0.6B --task=science   # a Hugging Face model
    torchrun --standalone --nproc_per_node=4 train_small.py ...  # several GPUs (DDP; --fsdp=True shards)

Reading order: the settings, then one distillation step (rollouts -> verify -> targets -> loss ->
update), distill() around it, evaluate(), and main() with the stages in order. What is for scale
or for runs that survive lives in modules named for it (run_dir.py, side_by_side.py, memory.py, ...).
"""
import copy
import math
import random
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import caopd
import cli
import memory
import metrics_log
import models
import parallel
import questions
import report
import run_dir
import side_by_side
import toy_base
from parallel import RANK, WORLD
from tokenizer import decode, decimals, encode, end_id, student_tokens, teacher_tokens

# -----------------------------------------------------------------------------
# settings: every global in this block is a setting, overridden as --key=value (the type must
# match); `python train_small.py --help` prints them with the comments beside them
# I/O
out_dir = "out"            # results.json, completions.jsonl, metrics.jsonl, plots, ckpt.pt, the cached base
export_dtype = "auto"      # out_dir/hf's dtype: "auto" (the loaded files'), "float32" or "bfloat16"
init_from = "scratch"      # "scratch" (the toy GPT), "resume" (the run in out_dir), or a Hugging Face model
seed = 0                   # training seed (base model, rollouts); OPD and CaOPD share it
method = "both"            # "opd", "caopd", or "both" (OPD then CaOPD from the same base)
smoke = False              # shrink every stage and the toy's questions to check the machinery in seconds
ckpt_every = 50            # steps between checkpoints; every stage also ends with one
max_bad_steps = 5          # non-finite losses or gradients in a row before the run stops
# task
task = "arith"             # "arith" (generated in code), "science" or "tooluse" (data/<task>/prepare.py)
data = ""                  # science / tooluse: training JSONL ("" = data/<task>/train.jsonl)
eval_data = ""             # science / tooluse: held-out JSONL ("" = data/<task>/eval.jsonl)
data_seed = 0              # arith: fixes the held-out questions, so every run is scored on the same ones
arith_ops = "+*"           # arith: the operations asked ("+", "*", "-")
arith_digits = 0           # arith: operands of 1 .. arith_digits digits (0: 3 for sums, 2 for products)
n_eval = 4000              # held-out questions (science / tooluse: the first n_eval of eval_data)
enable_thinking = "default"  # a chat template's enable_thinking: "default" (its own), "true" or "false"
# model (the toy GPT, trained from scratch in stage 0)
n_layer = 4                # transformer blocks
n_head = 4                 # attention heads per block
n_embd = 128               # width of the residual stream
block_size = 128           # longest sequence; the toy's longest teacher prompt + completion is ~90 tokens
# stage 0: the toy's supervised base model (toy_base.py); a pretrained model is the base
base_steps = 500           # optimizer steps
base_batch = 64            # questions per step
base_lr = 2e-3             # peak learning rate of AdamW
base_warmup = 100          # linear warm-up steps, then cosine decay to 0.1 x base_lr
base_conf_sigma = 0.15     # the teacher's stated confidence is trained toward a Gaussian of this width
base_conf_shape = 0.1      # the weight on its log-probabilities' shape (toy_base.soft_confidence_loss)
# rollouts
steps = 400                # distillation steps, per method
prompts_per_step = 16      # over all processes (torchrun): each takes an equal share
K = 8                      # rollouts per prompt; P_acc = correct / K
smooth_p_acc = False       # P_acc = (correct + 1) / (K + 2) instead, never 0 or 1 from a few rollouts
temperature = 0.3          # of the rollouts (evaluation is greedy)
top_k = 0                  # 0 = sample from the full vocabulary
max_new_tokens = 12        # of a completion; the toy's "Answer: 6887\nConfidence: 0.7" + the end token is 12
eval_batch = 0             # questions per greedy evaluation call (0 = 500, or fewer if memory holds fewer)
# teacher
teacher_context = "demo"   # a caopd.TEMPLATES name: "demo" (the reference), "correct_solution" (a rollout)
ema_rate = 0.0             # teacher <- (1 - a) teacher + a student after every step; 0 = a frozen teacher
caopd_parts = "abc"        # CaOPD's replacements: a completion's, b shown solution's confidence, c the Note
# loss
loss = "reverse"           # a caopd.DIVERGENCES name: "reverse" KL(student||teacher), "forward", or "jsd"
jsd_beta = 0.5             # the generalized JSD's mixing weight (loss="jsd" only)
fused = True               # the fused loss kernel (False: the same loss in plain autograd, any divergence)
skip_tokens = 0            # completion tokens left out of the loss (the authors' release skips 3)
lr = 3e-4                  # at the first step, then cosine to min_lr at the last
min_lr = 0.0               # the learning rate at the last step
grad_clip = 1.0            # gradient norm clip
# system
device = "auto"            # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
dtype = "auto"             # compute: "auto" (bfloat16 autocast on a GPU that has it), "float32", "bfloat16"
micro_batch = 0            # sequences per forward/backward pass (0 = all of a step's): activation memory
rollout_batch = 0          # rollouts per sampling call (0 = all of a step's, or fewer if memory holds fewer)
compile_decode = "auto"    # the decode step under torch.compile: "auto" (our GPT on a GPU), "true", "false"
grad_checkpoint = False    # recompute each block's activations in the backward pass: less memory
threads = 1                # torch CPU threads; 1 is steady on a shared 2-core machine
workers = 0                # 2: OPD and CaOPD side by side, 1: one after the other, 0: 2 given the cores
fsdp = False               # under torchrun: shard weights, gradients and AdamW's state (FSDP2) instead of DDP
log_every = 25             # steps between printed lines
eval_every = 0             # steps between held-out evaluations during distillation (0 = only at the end)
wandb_project = ""         # a wandb project that also gets metrics.jsonl, the settings, the plots ("" = none)
# -----------------------------------------------------------------------------
SETTINGS = cli.settings_block(globals(), __file__)  # name -> (default, help, group)
# --smoke: one-digit sums, which a base of 40 steps already gets right now and then, so some questions
# have 0 < P_acc < 1, correct_solution finds verified rollouts and OPD and CaOPD train differently
SMOKE = dict(base_steps=40, base_batch=16, base_warmup=10, steps=4, prompts_per_step=4, K=4, n_eval=16,
             log_every=8, ckpt_every=2, arith_ops="+", arith_digits=1)

def settings(**overrides):
    """The settings of a run: the defaults above, --smoke's smaller ones, then `overrides`; checked.
    experiments.py calls this too."""
    cfg = SimpleNamespace(**{k: v[0] for k, v in SETTINGS.items()})
    if overrides.get("smoke"):
        vars(cfg).update(SMOKE)
    if overrides.get("init_from", "scratch") not in ("scratch", "resume") and "base_steps" not in overrides:
        cfg.base_steps = 0  # a pretrained model is the base; stage 0 only when asked for
    vars(cfg).update(overrides)
    cli.check_settings(cfg)
    return cfg

# -----------------------------------------------------------------------------
# one distillation step: rollouts -> verify -> targets -> loss -> update

def rollouts(cfg, net, tok, exs, step, rows):
    """1. K rollouts per question, all in one batched sampling call (rollout_batch rows at a time).
    Their random numbers are one draw for the whole step's batch, seeded by the step, of which
    these rows (rows = (first, total) of all processes' rows) take theirs: the same rollouts after
    a resume, and for any number of processes or calls. Returns (prompts, sampled token lists)."""
    prompts = [p for ex in exs for p in [student_tokens(tok, ex, cfg.enable_thinking)] * cfg.K]
    (first, total), mb, sampled = rows, cfg.rollout_batch or len(prompts), []
    with parallel.gathered(net):
        for a in range(0, len(prompts), mb):
            gen = torch.Generator(cli.resolve_device(cfg.device)).manual_seed(cfg.seed * 1_000_003 + step)
            u = torch.rand(cfg.max_new_tokens, total, 1, generator=gen, device=gen.device) \
                if cfg.temperature else None  # (max_new_tokens, all rows, 1)
            with cli.autocast(cfg):
                sampled += parallel.inner(net).sample(
                    prompts[a:a + mb], cfg.max_new_tokens, end_id(tok), cfg.temperature, cfg.top_k,
                    uniforms=None if u is None else u[:, first + a:first + a + len(prompts[a:a + mb])])
    return prompts, sampled

def targets(cfg, tok, method, exs, sampled, texts, correct):
    """3. What the method trains on, per question: caopd.distillation_targets, where OPD and CaOPD
    differ. Returns (the completions' tokens, the teacher's prompts (one per completion), P_acc and
    the confidence the teacher is shown, per question). A completion whose text is the rollout's
    is its sampled tokens; a rewritten one is encoded anew, its body kept to the rollout's budget of
    tokens (a rollout of stray bytes decodes to U+FFFD, 3 bytes each, and would come back 3x longer)."""
    K, completions, teacher_prompts, p_acc, shown = cfg.K, [], [], [], []
    for g, ex in enumerate(exs):
        group = slice(g * K, g * K + K)
        texts_to_train, context, p = caopd.distillation_targets(
            method, texts[group], correct[group], ex["reference"], cfg.teacher_context, decimals(tok),
            cfg.smooth_p_acc, cfg.caopd_parts)
        for tokens, text, new in zip(sampled[group], texts[group], texts_to_train):
            if new == text:
                completions.append(tokens)
            else:
                body, line = caopd.split_confidence(new)  # line: the new "Confidence: P_acc", the one label
                completions.append(encode(tok, body)[:cfg.max_new_tokens] + encode(tok, line) + [end_id(tok)])
        teacher_prompts += [teacher_tokens(tok, ex, context, cfg.enable_thinking)] * K  # rendered once
        p_acc.append(p)
        shown.append(context["confidence"])
    return completions, teacher_prompts, p_acc, shown

def kl_backward(cfg, net, prompts, completions, teacher_prompts, estimator=None):
    """4. The loss and its backward pass: the per-token divergence to the teacher on the same
    completion tokens, averaged over a sequence's tokens, then over sequences; gradients accumulate
    in the student. micro_batch sequences at a time: each chunk's mean is weighted by its share of
    the step's sequences, so loss and gradient are those of the whole step, and no more than a
    chunk's activations (and teacher states) are alive at once; under several processes only the
    last chunk synchronizes the gradients. estimator: see caopd.Distiller.forward.
    Returns the step's loss (a 0-dim tensor)."""
    model = parallel.inner(net).student
    device = caopd.output_weight(model).device
    lens = torch.tensor([len(c) for c in completions], device=device)
    j = torch.arange(int(lens.max()), device=device)
    counted = (j[None] < lens[:, None]) & (j[None] >= cfg.skip_tokens)  # (BK, L) positions in the loss
    # mean over a sequence's tokens, then over sequences
    weight = counted / counted.sum(1, keepdim=True).clamp(min=1)
    total, mb, loss = weight.sum(dtype=torch.float64), cfg.micro_batch or len(prompts), 0.0
    model.train()  # sampling ran in eval mode (a model with dropout samples without it)
    for a in range(0, len(prompts), mb):
        b = slice(a, a + mb)
        w = weight[b, :max(map(len, completions[b]))]  # (mb, L'): L' is the chunk's longest completion
        with parallel.no_sync(net, last=a + mb >= len(prompts)):  # the engines see the loss in net's forward
            with cli.autocast(cfg):
                kl = net(prompts[b], completions[b], teacher_prompts[b], w, estimator)
                kl = kl * (w.sum(dtype=torch.float64) / total).to(kl.dtype)  # the chunk's share of the mean
            kl.backward()
        loss += kl.detach()
    model.eval()
    return loss

def distill_step(cfg, net, opt, tok, method, exs, verify, step, rows, estimator=None, on_log=None):
    """One step of stage 1 on this process's questions exs; returns its statistics by name (the
    mean over processes) and whether the update was made (a non-finite loss or gradient skips it)."""
    model, teacher = parallel.inner(net).student, parallel.inner(net).teacher
    t = time.perf_counter()
    prompts, sampled = rollouts(cfg, net, tok, exs, step, rows)  # 1. rollouts
    texts = [decode(tok, r) for r in sampled]
    correct = [verify(exs[i // cfg.K], text) for i, text in enumerate(texts)]  # 2. verify
    completions, teacher_prompts, p_acc, shown = targets(cfg, tok, method, exs, sampled, texts, correct)  # 3.
    t_sample = time.perf_counter() - t
    if on_log is not None and step % cfg.log_every == 0:
        on_log(step, model, teacher, prompts, completions, teacher_prompts)
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    kl = kl_backward(cfg, net, prompts, completions, teacher_prompts, estimator)  # 4. loss and gradients
    # the step's statistics, the mean over processes (token counts: x WORLD is the step's)
    stated = [c for c in map(caopd.parse_confidence, texts) if c is not None]
    stats = parallel.all_mean({
        "loss": kl.item(), "rollout_accuracy": sum(correct) / len(correct), "p_acc": sum(p_acc) / len(p_acc),
        "stated_confidence": sum(stated) / max(1, len(stated)), "format_rate": len(stated) / len(texts),
        "teacher_shown": sum(shown) / len(shown),
        "sampled_tokens": sum(map(len, sampled)), "trained_tokens": sum(map(len, completions))},
        caopd.output_weight(model).device)
    # 5. the update: the gradient clipped to norm grad_clip; a non-finite loss or gradient skips it
    norm = parallel.local_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    stats["grad_norm"], stats["lr"] = norm.item(), opt.param_groups[0]["lr"]
    ok = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    if ok:
        opt.step()
        caopd.ema_update(teacher, model, cfg.ema_rate)
    stats["seconds_sampling"], stats["seconds_training"] = t_sample, time.perf_counter() - t
    return stats, ok

# -----------------------------------------------------------------------------
# stage 1: on-policy distillation, OPD or CaOPD

def distiller(cfg, model):
    """The student `model`, its teacher (a copy: frozen, or the EMA of the student) and the loss,
    as one module (caopd.Distiller), wrapped for several processes where there are (parallel.wrap)."""
    if cfg.fsdp:  # a copy shaped and sharded like the student (an EMA teacher updates shard by shard)
        teacher = models.empty_like_model(cfg, model)
        with torch.no_grad():
            for t, s in zip([*teacher.parameters(), *teacher.buffers()],
                            [*model.parameters(), *model.buffers()]):
                t.copy_(s)
    elif memory.teacher_in_bfloat16(cfg):  # a frozen teacher needs no float32 master weights
        teacher = models.frozen_copy(model, torch.bfloat16)
    else:  # an EMA teacher's small updates need float32, like the student's
        teacher = copy.deepcopy(model)
    net = caopd.Distiller(model, teacher.requires_grad_(False).eval(), cfg.loss, cfg.jsd_beta, cfg.fused,
                          chunk=memory.loss_chunk, **models.seams(model, models.captures(cfg)))
    return parallel.wrap(net, cfg.fsdp, cfg.device)

def distill(cfg, net, tok, method, sample_train, verify, ck=None, held=None, estimator=None, on_log=None,
            log=None):
    """Stage 1 on net's student, in place (net: distiller()); returns the number of skipped
    (non-finite) updates. held: the held-out questions, evaluated every eval_every steps.
    estimator: see caopd.Distiller.forward. on_log(step, model, teacher, prompts, completions,
    teacher_prompts): called every log_every steps before the update (experiments.py logs
    entropies with it). log(record): the training log (metrics_log.py)."""
    rng = random.Random(cfg.seed + 1)  # OPD and CaOPD see the same questions
    model, teacher = parallel.inner(net).student, parallel.inner(net).teacher
    models.set_grad_checkpoint(model, cfg.grad_checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, bad, skipped = run_dir.restore(ck, model, teacher, opt, rng) if ck else (0, 0, 0)
    n = cfg.prompts_per_step // WORLD  # this process's questions: rank n .. rank n + n - 1 of each step's
    since = metrics_log.Throughput()  # tokens per second since the last printed step
    for step in tqdm(range(start, cfg.steps), desc=method, mininterval=2,
                     disable=RANK != 0 or cfg.workers == 2):  # side by side, two bars would overwrite
        # cosine from lr to min_lr; decayed to 0, the final model averages over its last stretch of steps
        for g in opt.param_groups:
            g["lr"] = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        exs = sample_train(rng, cfg.prompts_per_step)[RANK * n:RANK * n + n]
        rows = (RANK * n * cfg.K, cfg.prompts_per_step * cfg.K)
        stats, ok = distill_step(cfg, net, opt, tok, method, exs, verify, step, rows, estimator, on_log)
        bad, skipped = (0, skipped) if ok else (bad + 1, skipped + 1)
        if not ok:
            what = "loss" if not math.isfinite(stats["loss"]) else "gradient"
            tqdm.write(f"warning: {method} step {step}: non-finite {what}, update skipped ({bad} in a row, "
                       f"{skipped} in this stage)")
            if bad >= cfg.max_bad_steps:
                last = run_dir.checkpoint_path(cfg, method)
                cli.die(f"{method} step {step}: {bad} non-finite steps in a row (--max_bad_steps="
                        f"{cfg.max_bad_steps}); the last good checkpoint is {last} (--init_from=resume "
                        f"continues from it)", code=1)
        since.add(stats)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            metrics_log.train_step(log, cfg.loss, method, step, stats, skipped, since)
        if held and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            m, _ = evaluate(cfg, net, tok, method, held, verify)  # every process scores its share
            metrics_log.evaluation(log, method, step + 1, m, final=False)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            run_dir.save_checkpoint(cfg, tok, method, step + 1, model, teacher, opt, rng, bad, skipped)
    run_dir.save_checkpoint(cfg, tok, method, cfg.steps, model, teacher, opt, rng, bad, skipped)
    models.set_grad_checkpoint(model, False)
    return skipped

# -----------------------------------------------------------------------------
# evaluation: greedy answers to the held-out questions, student prompt only

@torch.no_grad()
def evaluate(cfg, net, tok, name, held, verify):
    """(metrics, one record per question) of net's student, on rank 0 ((None, None) elsewhere): each
    process answers its share of the questions, rank 0 gathers them. The same parser and verifier
    as training."""
    texts, mine = [], held[parallel.my_slice(len(held))]
    rows = cfg.eval_batch or memory.EVAL_CAP  # main sizes it to memory (memory.fit_batches)
    with parallel.gathered(net):
        for i in tqdm(range(0, len(mine), rows), desc=f"eval {name}", leave=False, disable=RANK != 0):
            prompts = [student_tokens(tok, ex, cfg.enable_thinking) for ex in mine[i:i + rows]]
            with cli.autocast(cfg):
                completions = parallel.inner(net).sample(prompts, cfg.max_new_tokens, end_id(tok), 0.0)
            texts += [decode(tok, r) for r in completions]
    texts = parallel.gather(texts)  # rank order is the questions' order
    if RANK != 0:
        return None, None
    records = []
    for ex, text in zip(held, texts):
        records.append({"model": name, "id": ex["id"], "answer": ex["answer"], "completion": text,
                        "correct": verify(ex, text), "confidence": caopd.parse_confidence(text)})
        if cfg.task == "tooluse":  # also every golden call, as the authors' eval_tooluse.py scores it
            records[-1]["correct_all_calls"] = questions.tasks.verify_tooluse_all_calls(ex["answer"], text)
        if "kind" in ex:
            records[-1]["kind"] = ex["kind"]
    return report.score(cfg, name, records), records

# -----------------------------------------------------------------------------

def main(argv):
    given = cli.parse_overrides(argv, SETTINGS, lambda: cli.print_help(
        SETTINGS, "python train_small.py [--key=value ...]", __doc__.strip().split("\n\n")[0]))
    try:
        train(given)
    except KeyboardInterrupt:  # Ctrl-C anywhere (side by side: every process got it): one line
        cli.die(run_dir.interrupted(given.get("out_dir", SETTINGS["out_dir"][0])), code=130)

def train(given):
    """The run of the command line's settings `given`: a new one, or the one in out_dir resumed."""
    # everything is checked before anything is written: settings, out_dir's lock, device, data, model, and
    # every file the run will read (run_dir.resume_plan)
    resuming = given.get("init_from") == "resume"
    cfg, ran = run_dir.resume_settings(given, SETTINGS) if resuming else (settings(**given), None)
    asked = dict(vars(cfg))  # as given: what follows resolves some of them for this machine
    tracker = metrics_log.import_tracker(cfg.wandb_project)
    run_dir.check_not_locked(cfg.out_dir)
    cfg.device = parallel.init(cli.resolve_device(cfg.device))  # torchrun: each process its GPU
    cfg.dtype = cli.resolve_dtype(cfg.dtype, cfg.device)
    torch.set_num_threads(cfg.threads)
    cfg.workers = side_by_side.how_many(cfg)
    files = None if cfg.task == "arith" else questions.read_task_files(cfg)
    base, tok, context, files_dtype = models.load_model(cfg)
    cfg.export_dtype = files_dtype if cfg.export_dtype == "auto" else cfg.export_dtype
    held, sample_train, verify = questions.load_task(cfg, tok, files, context)
    if cfg.smoke and "max_new_tokens" not in given:  # a real tokenizer's answers take more tokens
        cfg.max_new_tokens = max(cfg.max_new_tokens, questions.answer_tokens(cfg, tok, held)[0])
    questions.check_lengths(cfg, tok, held, context)
    memory.fit_batches(cfg, base, tok, held)  # eval_batch, rollout_batch: rows a call that fit in memory
    run_dir.identify(cfg, ran)
    methods = ["opd", "caopd"] if cfg.method == "both" else [cfg.method]
    cache = toy_base.cache_path(cfg, base, cfg.out_dir)
    cached = bool(cfg.base_steps) and toy_base.check_cache(cfg, base, cache)
    plan = run_dir.resume_plan(cfg, resuming, methods, base, cached)
    kept = metrics_log.kept_lines(cfg, plan.resumed, ["base", *methods])  # a resumed run's, to its checkpoint
    tracker_run = metrics_log.start_tracker(cfg, tracker)
    run_dir.take_out_dir(cfg.out_dir)
    run_dir.begin(cfg, None if resuming else asked)  # a new run: another's files aside, then run.json
    log, finish = metrics_log.metrics_log(cfg, tracker, tracker_run, kept)
    report.describe_run(cfg, base, tok, held, SMOKE)
    t_start, seconds, skipped, results = time.time(), {}, {}, {}

    # stage 0, the toy's base, cached: the same settings give the same base, so it is trained once
    t0 = time.time()
    if cfg.base_steps:
        toy_base.cached_base(cfg, base, tok, sample_train, cfg.out_dir, plan.checkpoint("base"), log,
                             plan.base_again)
    seconds["base"], seconds["eval"] = time.time() - t0, 0.0

    def evaluated(name):  # each model is scored as soon as it exists (by all processes): one is kept
        cli.stop_at(f"evaluate {name}")
        t0 = time.time()
        results[name] = evaluate(cfg, net, tok, name, held, verify)
        seconds["eval"] += time.time() - t0
        if not any(r["kind"] == "eval" and r["stage"] == name and r.get("final") for r in kept):  # once
            step = cfg.base_steps if name == "base" else cfg.steps
            metrics_log.evaluation(log, name, step, results[name][0])

    net = distiller(cfg, base)  # the student is the base; one model (and its teacher) in memory
    evaluated("base")
    start = parallel.snapshot(base)  # every method starts from the base's weights, kept on the CPU

    # stage 1: each method from the base, the student to out_dir/<method>.pt
    def distilled(m):
        t0 = time.time()
        parallel.restore(base, start)
        reset_teacher(net)
        skipped[m] = distill(cfg, net, tok, m, sample_train, verify, plan.checkpoint(m), held=held, log=log)
        seconds[m] = time.time() - t0
        run_dir.save_student(cfg, tok, m, base, skipped[m], seconds[m], last=m == methods[-1])

    if cfg.workers == 2:  # both methods at once, each in a process of its own (and on a core of its own)
        side_by_side.run(cfg, distilled, methods, plan)
    for m in methods:
        if cfg.workers == 1 and not plan.finished(m):
            distilled(m)
        else:  # trained in a process of its own, or before an interruption: its file
            skipped[m], seconds[m] = run_dir.load_student(cfg, m, base, plan.students.get(m))
        evaluated(m)
    if RANK == 0:
        cli.stop_at("report")
        seconds["total"] = time.time() - t_start
        report.write(cfg, results, skipped, seconds, finish)
    parallel.close()

@torch.no_grad()
def reset_teacher(net):
    """The teacher becomes a copy of the student again (each method starts from the base)."""
    d = parallel.inner(net)
    for t, s in zip(d.teacher.parameters(), d.student.parameters()):
        t.copy_(s)

if __name__ == "__main__":
    main(sys.argv[1:])
