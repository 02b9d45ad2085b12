"""
Watch on-policy distillation become overconfident, and CaOPD stay calibrated, on a laptop.

Stage 0 trains a small GPT from scratch on a toy arithmetic task (the "base" model, toy_base.py).
Stage 1 distills it on-policy toward a teacher that sees a worked demonstration: once as plain
OPD, once as CaOPD, from the same base with the same seed. Then all three answer the same
held-out questions (greedy) and we compare accuracy and calibration.

    python train_small.py                          # everything, a few minutes on one CPU core
    python train_small.py --help                   # every setting, its default and what it does
    python train_small.py --method=caopd --seed=1  # one method, another seed
    python train_small.py --smoke=True             # the whole pipeline in seconds (machinery only)
    python train_small.py ... --init_from=resume   # continue an interrupted run: the same command + this
    python curves.py out/metrics.jsonl b/metrics.jsonl  # the training curves of two runs, side by side
    python train_small.py --init_from=Qwen/Qwen3-0.6B --task=science   # a Hugging Face model
    # several GPUs (DDP; --fsdp=True shards)
    torchrun --standalone --nproc_per_node=4 train_small.py ...
"""
import copy
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

import caopd
import common
import parallel
import toy_base
from data import tasks
from common import decode, student_tokens, teacher_tokens
from parallel import RANK, WORLD

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
compile_decode = "auto"    # the rollouts' decode step under torch.compile: "auto" (on a GPU), "true", "false"
grad_checkpoint = False    # recompute each block's activations in the backward pass: less memory
threads = 1                # torch CPU threads; 1 is steady on a shared 2-core machine
workers = 0                # 2: OPD and CaOPD side by side, 1: one after the other, 0: 2 given the cores
fsdp = False               # under torchrun: shard weights, gradients and AdamW's state (FSDP2) instead of DDP
log_every = 25             # steps between printed lines
eval_every = 0             # steps between held-out evaluations during distillation (0 = only at the end)
wandb_project = ""         # a wandb project that also gets metrics.jsonl, the settings, the plots ("" = none)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals(), __file__)  # name -> (default, help, group)
# --smoke: one-digit sums, which a base of 40 steps already gets right now and then, so some questions
# have 0 < P_acc < 1, correct_solution finds verified rollouts and OPD and CaOPD train differently
SMOKE = dict(base_steps=40, base_batch=16, base_warmup=10, steps=4, prompts_per_step=4, K=4, n_eval=16,
             log_every=2, ckpt_every=2, arith_ops="+", arith_digits=1)

def settings(**overrides):
    """The settings of a run: the defaults above, --smoke's smaller ones, then `overrides`; checked.
    experiments.py calls this too."""
    cfg = SimpleNamespace(**{k: v[0] for k, v in SETTINGS.items()})
    if overrides.get("smoke"):
        vars(cfg).update(SMOKE)
    if overrides.get("init_from", "scratch") not in ("scratch", "resume") and "base_steps" not in overrides:
        cfg.base_steps = 0  # a pretrained model is the base; stage 0 only when asked for
    vars(cfg).update(overrides)
    check_settings(cfg)
    return cfg

def check_settings(cfg):
    c = cfg
    common.check([
        (c.method in ("opd", "caopd", "both"), "method", "must be 'opd', 'caopd' or 'both'"),
        (c.task in ("arith", "science", "tooluse"), "task", "must be 'arith', 'science' or 'tooluse'"),
        (c.task == "arith" or c.init_from != "scratch", "task",
         "needs a pretrained model: add --init_from=<Hugging Face model id or directory>"),
        (c.task == "arith" or c.base_steps == 0, "base_steps",
         "stage 0 is the toy curriculum: --task=arith only"),
        (c.teacher_context in caopd.TEMPLATES, "teacher_context", f"must be one of {list(caopd.TEMPLATES)}"),
        (set(c.caopd_parts) <= set("abc") and len(c.caopd_parts) == len(set(c.caopd_parts)), "caopd_parts",
         "must be letters of 'abc', each at most once ('' trains like OPD)"),
        (c.arith_ops and set(c.arith_ops) <= set("+*-"), "arith_ops", "must be one or more of '+', '*', '-'"),
        (c.arith_digits >= 0, "arith_digits", "must be >= 0 (0: 3 for sums, 2 for products)"),
        (c.enable_thinking in ("default", "true", "false"), "enable_thinking",
         "must be 'default', 'true' or 'false'"),
        (c.loss in caopd.DIVERGENCES, "loss", f"must be one of {list(caopd.DIVERGENCES)}"),
        (not c.fused or c.loss in caopd.FUSED, "loss",
         "has no fused kernel (its gradients are derived for reverse, forward, jsd): add --fused=False"),
        (0 <= c.jsd_beta <= 1, "jsd_beta", "must be in [0, 1]"),
        (c.K >= 1, "K", "must be >= 1"),
        (c.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)"),
        (0 <= c.ema_rate <= 1, "ema_rate", "must be in [0, 1]"),
        (c.top_k >= 0, "top_k", "must be >= 0"),
        (c.steps >= 0, "steps", "must be >= 0"),
        (c.base_steps >= 0, "base_steps", "must be >= 0"),
        (c.skip_tokens >= 0, "skip_tokens", "must be >= 0"),
        *((getattr(c, k) >= 1, k, "must be >= 1") for k in (
            "prompts_per_step", "base_batch", "n_eval", "max_new_tokens", "threads", "log_every",
            "ckpt_every", "max_bad_steps", "n_layer", "n_head", "n_embd", "block_size")),
        (c.eval_batch >= 0, "eval_batch", "must be >= 0 (0 = 500, or fewer if memory holds fewer)"),
        (c.compile_decode in ("auto", "true", "false"), "compile_decode",
         "must be 'auto', 'true' or 'false'"),
        (c.compile_decode != "true" or not c.fsdp, "compile_decode",
         "captures an unsharded model's step: not with --fsdp (drop one)"),
        (c.n_embd % c.n_head == 0, "n_head", f"must divide n_embd ({c.n_embd})"),
        (c.lr > 0, "lr", "must be > 0"),
        (c.base_lr > 0, "base_lr", "must be > 0"),
        (0 <= c.min_lr <= c.lr, "min_lr", f"must be in [0, lr] (lr = {c.lr})"),
        (c.grad_clip > 0, "grad_clip", "must be > 0"),
        (c.eval_every >= 0, "eval_every", "must be >= 0 (0 = only at the end)"),
        (c.base_conf_sigma > 0, "base_conf_sigma", "must be > 0"),
        (c.base_conf_shape >= 0, "base_conf_shape", "must be >= 0"),
        (c.base_warmup >= 1, "base_warmup", "must be >= 1"),
        (c.device in ("auto", "cpu", "cuda", "mps"), "device", "must be 'auto', 'cpu', 'cuda' or 'mps'"),
        (c.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be 'auto', 'float32' or 'bfloat16'"),
        (c.export_dtype in ("auto", "float32", "bfloat16"), "export_dtype",
         "must be 'auto', 'float32' or 'bfloat16'"),
        (c.micro_batch >= 0, "micro_batch", "must be >= 0 (0 = every sequence of a step at once)"),
        (c.rollout_batch >= 0, "rollout_batch", "must be >= 0 (0 = every rollout of a step at once)"),
        (c.prompts_per_step % WORLD == 0, "prompts_per_step", f"must be divisible by the {WORLD} processes"),
        (not c.fsdp or WORLD > 1, "fsdp",
         "shards a model across processes: run under torchrun --nproc_per_node=N"),
        (c.workers in (0, 1, 2), "workers", "must be 0 (2 where it pays), 1 or 2"),
        (c.workers != 2 or (c.method == "both" and c.init_from == "scratch" and WORLD == 1), "workers",
         "distills OPD and CaOPD side by side: --method=both, the toy, one process (no torchrun)"),
        (c.workers != 2 or sys.platform == "linux", "workers",
         f"forks a process per method, which {sys.platform} does not support safely: use --workers=1"),
        (not c.fsdp or c.init_from != "scratch", "fsdp",
         "shards a Hugging Face model's decoder layers; the toy GPT runs under DDP (drop --fsdp)"),
    ], cfg)

# -----------------------------------------------------------------------------
# stage 1: on-policy distillation, OPD or CaOPD

def distiller(cfg, model):
    """The student `model`, its teacher (a copy: frozen, or the EMA of the student) and the loss,
    as one module (caopd.Distiller), wrapped for several processes where there are (parallel.wrap)."""
    if cfg.fsdp:  # a copy shaped and sharded like the student (an EMA teacher updates shard by shard)
        teacher = common.empty_like_model(cfg, model)
        with torch.no_grad():
            for t, s in zip([*teacher.parameters(), *teacher.buffers()],
                            [*model.parameters(), *model.buffers()]):
                t.copy_(s)
    elif common.teacher_in_bfloat16(cfg):  # a frozen teacher needs no float32 master weights
        teacher = common.frozen_copy(model, torch.bfloat16)
    else:  # an EMA teacher's small updates need float32, like the student's
        teacher = copy.deepcopy(model)
    net = caopd.Distiller(model, teacher.requires_grad_(False), cfg.loss, cfg.jsd_beta, cfg.fused)
    return parallel.wrap(net, cfg.fsdp, cfg.device)

@torch.no_grad()
def reset_teacher(net):
    """The teacher becomes a copy of the student again (each method starts from the base)."""
    d = parallel.inner(net)
    for t, s in zip(d.teacher.parameters(), d.student.parameters()):
        t.copy_(s)

def compiled(cfg):
    """Whether sampling runs the captured decode step (caopd.sample): --compile_decode; "auto" where
    the host would set the pace, a GPU (not under FSDP2, whose hooks a captured step cannot hold)."""
    if cfg.compile_decode == "auto":
        return "cuda" in common.resolve_device(cfg.device) and not cfg.fsdp
    return cfg.compile_decode == "true"

def rollout_batch(cfg, net, tok, method, exs, verify, step, rows):
    """Steps 1-3 of a distillation step for this process's questions exs: K rollouts each, their
    verdicts and P_acc, then the training completions and the teacher's prompts.
    Returns (prompts, completions, teacher_prompts, rollout texts, verdicts, P_acc per question,
    number of sampled tokens)."""
    K, places, end = cfg.K, common.decimals(tok), common.end_id(tok)
    # 1. K rollouts per prompt, all in one batched call (or rollout_batch rows at a time). Their random
    # numbers come from a generator seeded by the step: the same rollouts after a resume, and for any number
    # of processes or calls (each call draws the uniforms of the whole batch and keeps its rows')
    rendered = [student_tokens(tok, ex, cfg.enable_thinking) for ex in exs]  # each question rendered once
    prompts = [p for p in rendered for _ in range(K)]
    rollouts, mb, sample = [], cfg.rollout_batch or len(prompts), parallel.inner(net).sample
    with parallel.gathered(net):
        for a in range(0, len(prompts), mb):
            gen = torch.Generator(common.resolve_device(cfg.device)).manual_seed(cfg.seed * 1_000_003 + step)
            with common.autocast(cfg):
                rollouts += sample(prompts[a:a + mb], cfg.max_new_tokens, end, cfg.temperature, cfg.top_k,
                                   gen, rows=(rows[0] + a, rows[1]), compiled=compiled(cfg))
    texts = [decode(tok, r) for r in rollouts]
    # 2. verify them
    correct = [verify(exs[i // K], t) for i, t in enumerate(texts)]
    # 3. per question, what the method trains on: caopd.distillation_targets, where OPD and CaOPD differ
    completions, teacher_prompts, p_acc = [], [], []
    for g, ex in enumerate(exs):
        group, sampled = slice(g * K, g * K + K), texts[g * K:g * K + K]
        targets, context, p = caopd.distillation_targets(method, sampled, correct[group], ex["reference"],
                                                         cfg.teacher_context, places, cfg.smooth_p_acc,
                                                         cfg.caopd_parts)
        if targets is sampled:  # left as sampled: train on the sampled tokens themselves
            completions += rollouts[group]
        else:  # rewritten, so re-encoded; the body keeps at most the rollout's budget of tokens (a rollout of
            # stray bytes decodes to U+FFFD, 3 bytes each, and would come back 3x longer)
            for text in targets:
                # line: the new "Confidence: P_acc", the only label left
                body, line = caopd.split_confidence(text)
                completions.append(common.encode(tok, body)[:cfg.max_new_tokens] + common.encode(tok, line)
                                   + [end])
        teacher_prompts += [teacher_tokens(tok, ex, context, cfg.enable_thinking)] * K  # one per question
        p_acc.append(p)
    return prompts, completions, teacher_prompts, texts, correct, p_acc, sum(map(len, rollouts))

def kl_backward(cfg, net, prompts, completions, teacher_prompts, estimator=None):
    """Step 4 and its backward pass: the per-token divergence to the teacher on the same completion
    tokens, averaged over a sequence's tokens, then over sequences; gradients accumulate in the
    student. micro_batch sequences at a time: each chunk's mean is weighted by its share of the
    step's sequences, so loss and gradient are those of the whole step, and no more than a chunk's
    activations (and teacher states) are alive at once; under several processes only the last
    chunk synchronizes the gradients. estimator: see caopd.Distiller.forward.
    Returns the step's loss (a 0-dim tensor)."""
    model = parallel.inner(net).student
    device = caopd.output_weight(model).device
    lens = torch.tensor([len(c) for c in completions], device=device)
    j = torch.arange(int(lens.max()), device=device)
    counted = (j[None] < lens[:, None]) & (j[None] >= cfg.skip_tokens)  # (BK, L) positions in the loss
    # mean over a sequence's tokens, then over sequences
    weight = counted / counted.sum(1, keepdim=True).clamp(min=1)
    total, mb, loss = weight.sum(dtype=torch.float64), cfg.micro_batch or len(prompts), 0.0
    checkpointing = cfg.grad_checkpoint and not isinstance(model, caopd.GPT)
    for a in range(0, len(prompts), mb):
        b = slice(a, a + mb)
        w = weight[b, :max(map(len, completions[b]))]  # (mb, L'): L' is the chunk's longest completion
        model.train(checkpointing)  # a Hugging Face model checkpoints only in train mode (it has no dropout)
        with parallel.no_sync(net, last=a + mb >= len(prompts)):  # the engines see the loss in net's forward
            with common.autocast(cfg):
                kl = net(prompts[b], completions[b], teacher_prompts[b], w, estimator)
                # the chunk's share of the step's mean
                kl = kl * (w.sum(dtype=torch.float64) / total).to(kl.dtype)
            kl.backward()
        model.eval()
        loss += kl.detach()
    return loss

def distill(cfg, net, tok, method, sample_train, verify, ck=None, held=None, estimator=None, on_log=None,
            log=None):
    """Stage 1 on net's student, in place (net: distiller()); returns the number of skipped
    (non-finite) updates. held: the held-out questions, evaluated every eval_every steps.
    estimator: see kl_backward. on_log(step, model, teacher, prompts, completions, teacher_prompts):
    called every log_every steps before the update (experiments.py logs entropies with it).
    log(record): the training log (common.metrics_log), given each printed step and evaluation."""
    rng = random.Random(cfg.seed + 1)  # OPD and CaOPD see the same questions
    model, teacher = parallel.inner(net).student, parallel.inner(net).teacher
    device = caopd.output_weight(model).device
    common.set_grad_checkpoint(model, cfg.grad_checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, bad, skipped = common.restore(ck, model, teacher, opt, rng) if ck else (0, 0, 0)
    n = cfg.prompts_per_step // WORLD  # this process's prompts: rank n .. rank n + n - 1 of each step's batch
    t0 = time.time()
    # tokens and seconds of the rollouts and of the training since the last logged step: its throughput
    sampled = trained = t_sample = t_train = 0.0
    bar = RANK == 0 and cfg.workers != 2  # side by side, the two methods' bars would overwrite each other
    for step in tqdm(range(start, cfg.steps), desc=method, mininterval=2, disable=not bar):
        # cosine from lr to min_lr. The stated confidence follows the P_acc of the last few batches:
        # with min_lr = 0.1 x lr it still swung by up to 0.1 between evaluations 10 steps apart
        # (--eval_every=10); decayed to 0, the final model averages over its last stretch of steps
        for g in opt.param_groups:
            g["lr"] = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        exs = sample_train(rng, cfg.prompts_per_step)[RANK * n:RANK * n + n]
        t = time.perf_counter()
        prompts, completions, teacher_prompts, texts, correct, p_acc, n_sampled = rollout_batch(
            cfg, net, tok, method, exs, verify, step, (RANK * n * cfg.K, cfg.prompts_per_step * cfg.K))
        t_sample += time.perf_counter() - t
        if on_log is not None and step % cfg.log_every == 0:
            on_log(step, model, teacher, prompts, completions, teacher_prompts)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # gradients averaged over processes
        kl = kl_backward(cfg, net, prompts, completions, teacher_prompts, estimator)
        stated = [c for c in map(caopd.parse_confidence, texts) if c is not None]
        # the processes' means; the token counts' means x WORLD are the step's
        stats = parallel.all_mean([kl.item(), sum(correct) / len(correct), sum(p_acc) / len(p_acc),
                                   sum(stated) / max(1, len(stated)), len(stated) / len(texts),
                                   n_sampled, sum(map(len, completions))], device)
        norm = parallel.local_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        # skip the update, keep the last good state
        if not (math.isfinite(stats[0]) and torch.isfinite(norm)):
            bad, skipped = bad + 1, skipped + 1
            what = "loss" if not math.isfinite(stats[0]) else "gradient"
            tqdm.write(f"warning: {method} step {step}: non-finite {what}, update skipped ({bad} in a row, "
                       f"{skipped} in this stage)")
            if bad >= cfg.max_bad_steps:
                common.die(f"{method} step {step}: {bad} non-finite steps in a row (--max_bad_steps="
                           f"{cfg.max_bad_steps}); the last good checkpoint is {cfg.out_dir}/ckpt.pt "
                           f"(--init_from=resume continues from it)", code=1)
        else:
            bad = 0
            opt.step()
            caopd.ema_update(teacher, model, cfg.ema_rate)
        t_train += time.perf_counter() - t
        sampled, trained = sampled + stats[5] * WORLD, trained + stats[6] * WORLD
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            # logged first: a printed step is in metrics.jsonl
            if log:
                log({"kind": "train", "stage": method, "method": method, "step": step, "loss": stats[0],
                     "rollout_accuracy": stats[1], "p_acc": stats[2], "stated_confidence": stats[3],
                     "format_rate": stats[4], "lr": opt.param_groups[0]["lr"], "grad_norm": norm.item(),
                     "skipped": skipped, "rollout_tokens_per_s": sampled / t_sample,
                     "train_tokens_per_s": trained / t_train})
            tqdm.write(f"{method:5s} step {step:4d} | {cfg.loss} KL {stats[0]:.4f}"
                       f" | rollout acc {stats[1]:.3f} | P_acc {stats[2]:.3f} | stated conf {stats[3]:.3f}"
                       f" | format {stats[4]:.2f}"
                       f" | {time.time() - t0:.1f}s")
            sampled = trained = t_sample = t_train = 0.0
        if held and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            m, _ = evaluate(cfg, net, tok, method, held, verify)  # every process scores its share
            if RANK == 0:
                if log:
                    log({"kind": "eval", "stage": method, "method": method, "step": step + 1, "final": False,
                         **m})
                tqdm.write(f"{method:5s} step {step + 1:4d} | held-out acc {m['accuracy']:.3f}"
                           f" | conf {m['mean_confidence']:.3f} | ECE {m['ece']:.3f} | OCG {m['ocg']:+.3f}"
                           f" | SPR {m['spr']:.3f} | AUROC {m['auroc']:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            common.save_checkpoint(cfg, tok, method, step + 1, model, teacher, opt, rng, bad, skipped)
    common.save_checkpoint(cfg, tok, method, cfg.steps, model, teacher, opt, rng, bad, skipped)
    common.set_grad_checkpoint(model, False)
    return skipped

# -----------------------------------------------------------------------------
# evaluation: greedy answers to the held-out questions, student prompt only

@torch.no_grad()
def evaluate(cfg, net, tok, name, held, verify):
    """(metrics, one record per question) of net's student, on rank 0 ((None, None) elsewhere): each
    process answers its share of the questions, rank 0 gathers them. The same parser and verifier
    as training."""
    texts, mine = [], held[parallel.my_slice(len(held))]
    rows = cfg.eval_batch or common.EVAL_CAP  # main sizes it to memory (common.fit_batches)
    with parallel.gathered(net):
        for i in tqdm(range(0, len(mine), rows), desc=f"eval {name}", leave=False,
                      disable=RANK != 0):
            prompts = [student_tokens(tok, ex, cfg.enable_thinking) for ex in mine[i:i + rows]]
            with common.autocast(cfg):
                completions = parallel.inner(net).sample(prompts, cfg.max_new_tokens, common.end_id(tok),
                                                         temperature=0, compiled=compiled(cfg))
            texts += [decode(tok, r) for r in completions]
    texts = parallel.gather(texts)  # rank order is the questions' order
    if RANK != 0:
        return None, None
    records = []
    for ex, text in zip(held, texts):
        records.append({"model": name, "id": ex["id"], "answer": ex["answer"], "completion": text,
                        "correct": verify(ex, text), "confidence": caopd.parse_confidence(text)})
        if cfg.task == "tooluse":  # also every golden call, as the authors' eval_tooluse.py scores it
            records[-1]["correct_all_calls"] = tasks.verify_tooluse_all_calls(ex["answer"], text)
        if "kind" in ex:
            records[-1]["kind"] = ex["kind"]
    stated = [r["confidence"] or 0.0 for r in records]
    metrics = caopd.calibration_metrics([r["correct"] for r in records], stated)
    metrics["format_rate"] = sum(r["confidence"] is not None for r in records) / len(records)
    raw = [caopd.parse_confidence(r["completion"], clip=False) for r in records]
    # stated outside [0, 1]
    metrics["clipped_rate"] = sum(c is not None and not 0 <= c <= 1 for c in raw) / len(records)
    # an answer without a confidence counts as 0: on a wrong answer that looks calibrated, so a model
    # that mostly states none has an ECE (and SPR, AUROC, Brier) that says nothing
    metrics["format_ok"] = metrics["format_rate"] >= 0.5
    if not metrics["format_ok"]:
        tqdm.write(f"warning: {name}: only {metrics['format_rate']:.0%} of its answers state a confidence "
                   f"(format rate < 0.5): its ECE and the other calibration metrics are not meaningful")
    if cfg.task == "tooluse":  # the same stated confidences against the all-calls verdicts
        metrics["all_calls"] = caopd.calibration_metrics([r["correct_all_calls"] for r in records], stated)
    return metrics, records

# -----------------------------------------------------------------------------

RESUME_FREE = ("init_from", "out_dir", "device", "threads", "log_every", "eval_every",
               "wandb_project")  # change no number

def resume_settings(given):
    """--init_from=resume: the checkpoint's settings and the checkpoint. The rest of the command line
    may repeat the run's own settings (the command that was interrupted, with --init_from=resume
    added); one that differs is an error naming it. RESUME_FREE may change."""
    path = os.path.join(given.get("out_dir", out_dir), "ckpt.pt")
    ck = common.load_checkpoint(path)
    differ = [f"--{k}={v!r} (the run has {ck['config'].get(k)!r})" for k, v in given.items()
              if k not in RESUME_FREE and ck["config"].get(k) != v]
    if differ:
        common.die(f"--init_from=resume continues the run in {path} with its own settings, and these differ: "
                   f"{', '.join(differ)}; drop them, or start a new run in another --out_dir")
    # a checkpoint of older code: its settings
    saved = {k: v for k, v in ck["config"].items() if k in SETTINGS}
    missing, dropped = sorted(set(SETTINGS) - set(saved)), sorted(set(ck["config"]) - set(SETTINGS))
    if missing or dropped:
        print(f"note: {path} was written by another version: {', '.join(missing) or 'no setting'} take their "
              f"defaults, {', '.join(dropped) or 'none'} no longer exist")
    cfg = SimpleNamespace(**{**{k: v[0] for k, v in SETTINGS.items()}, **saved,
                             **{k: v for k, v in given.items() if k in RESUME_FREE[1:]}})
    check_settings(cfg)
    return cfg, ck

def kept_on_resume(record, order, resumed):
    """Whether a line of an interrupted run's metrics.jsonl stays when it resumes. order: the run's
    stages; resumed: {stage: the step it goes on from} (side by side, both methods). Kept: the lines
    of the stages before those (their final evaluations too: they are not logged again) and, of a
    stage that goes on, those of the steps before its step and the evaluations up to it (the one at
    its step came before the checkpoint). So the file goes on without a duplicated or missing line."""
    if record["stage"] not in order:  # a later run's into this out_dir, stopped before its first checkpoint
        return False
    if record["stage"] not in resumed:  # finished before, or not begun
        return order.index(record["stage"]) < min(order.index(s) for s in resumed)
    step = resumed[record["stage"]]
    if record["kind"] == "train":
        return record["step"] < step
    return not record["final"] and record["step"] <= step

def main(argv):
    given = common.parse_overrides(argv, SETTINGS, lambda: common.print_help(
        SETTINGS, "python train_small.py [--key=value ...]", __doc__.strip().split("\n\n")[0]))
    # everything is checked before anything is written: settings, out_dir's lock, device, data, model
    ck = None
    if given.get("init_from") == "resume":  # the run's own settings, then on from its stage and step
        cfg, ck = resume_settings(given)
    else:
        cfg = settings(**given)
    tracker = common.import_tracker(cfg.wandb_project)
    common.check_not_locked(cfg.out_dir)
    cfg.device = parallel.init(common.resolve_device(cfg.device))  # torchrun: each process its GPU
    cfg.dtype = common.resolve_dtype(cfg.dtype, cfg.device)
    torch.set_num_threads(cfg.threads)
    if cfg.workers == 0:  # side by side where it pays: the toy's two methods on a CPU with a core for each
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cfg.workers = 2 if (cfg.method == "both" and cfg.init_from == "scratch" and cfg.device == "cpu"
                            and WORLD == 1 and sys.platform == "linux" and cores >= 2 * cfg.threads) else 1
    files = None if cfg.task == "arith" else common.read_task_files(cfg)
    base, tok, context, files_dtype = common.load_model(cfg)
    if cfg.export_dtype == "auto":
        cfg.export_dtype = files_dtype
    if cfg.enable_thinking != "default" and not common.template_reads(tok, "enable_thinking"):
        why = "the toy has no chat template" if cfg.init_from == "scratch" else \
            "its chat template never reads it"
        print(f"--enable_thinking={cfg.enable_thinking!r} ignored: {why}")
    held, sample_train, verify = common.load_task(cfg, tok, files, context)
    common.check_lengths(cfg, tok, held, context)
    common.fit_batches(cfg, base, tok, held)  # eval_batch, rollout_batch: rows a call that fit in memory
    common.take_out_dir(cfg.out_dir)
    if ck:
        print(f"resuming {ck['stage']} at step {ck['step']} from {cfg.out_dir}/ckpt.pt")
    methods = ["opd", "caopd"] if cfg.method == "both" else [cfg.method]
    stages = (["base"] if cfg.base_steps else []) + methods
    # stages before ck's are finished; it continues from ck ("side by side": both methods from their own)
    at = -1 if not ck else stages.index(methods[0] if ck["stage"] == "side by side" else ck["stage"])
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    kept = []
    if ck and RANK == 0:  # the interrupted run's lines up to its checkpoint; the run goes on from there
        resumed = {ck["stage"]: ck["step"]}
        if ck["stage"] == "base" and os.path.exists(toy_base.cache_path(cfg, base, cfg.out_dir)):
            resumed = {methods[0]: 0}  # stage 0 ended after its last checkpoint: its base is reused
        if ck["stage"] == "side by side":  # each method from its own checkpoint, if it wrote one
            resumed = {m: common.load_checkpoint(common.checkpoint_path(cfg, m))["step"]
                       if os.path.exists(common.checkpoint_path(cfg, m)) else 0 for m in methods}
        kept = [r for r in common.read_metrics(metrics, interrupted=True)
                if kept_on_resume(r, ["base", *methods], resumed)]
    log, finish = common.metrics_log(cfg, tracker, kept)
    if cfg.smoke:
        shrunk = ", ".join(f"{k}={getattr(cfg, k)}" for k in SMOKE)
        print(f"smoke run: every stage shrunk to seconds ({shrunk}); it checks the machinery, its numbers "
              f"mean nothing")
    print(f"device {cfg.device}, {cfg.dtype} compute, {WORLD} process(es), {cfg.threads} thread(s), "
          f"decode step {'compiled' if compiled(cfg) else 'eager'}, "
          f"vocabulary {caopd.output_weight(base).shape[0]} tokens, {len(held)} held-out questions, model "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    t_start, seconds, skipped = time.time(), {}, {}

    # stage 0, cached: the same settings give the same base, so it is trained once and reused
    t0 = time.time()
    if cfg.base_steps:
        toy_base.cached_base(cfg, base, tok, sample_train, cfg.out_dir, ck if at == 0 else None, log)
    seconds["base"], seconds["eval"], results = time.time() - t0, 0.0, {}

    # each model is scored as soon as it exists (by all processes): then only one is kept
    def evaluated(name):
        t0 = time.time()
        results[name] = evaluate(cfg, net, tok, name, held, verify)
        seconds["eval"] += time.time() - t0
        # a resumed run scores every model again, the same answers: logged once
        if RANK == 0 and not any(r["kind"] == "eval" and r["stage"] == name and r["final"] for r in kept):
            log({"kind": "eval", "stage": name, "method": None if name == "base" else name,
                 "step": cfg.base_steps if name == "base" else cfg.steps, "final": True, **results[name][0]})

    net = distiller(cfg, base)  # the student is the base; one model (and its teacher) in memory
    evaluated("base")
    start = parallel.snapshot(base)  # every method starts from the base's weights, kept on the CPU
    model = base
    saved = lambda m: os.path.join(cfg.out_dir, f"{m}.pt")

    def distilled(m):  # stage 1 of method m from the base, the student to out_dir/<m>.pt
        t0, mine = time.time(), common.checkpoint_path(cfg, m)
        resume = ck if ck and ck["stage"] == m else None
        if ck and ck["stage"] == "side by side" and os.path.exists(mine):  # its own checkpoint
            resume = common.load_checkpoint(mine)
        parallel.restore(model, start)
        reset_teacher(net)
        n_skipped = distill(cfg, net, tok, m, sample_train, verify, resume, held=held, log=log)
        state = parallel.full_state(model)  # gathered on rank 0 under FSDP2
        skipped[m], seconds[m] = n_skipped, time.time() - t0
        if RANK == 0:
            common.write_atomic(saved(m), {"model": state, "config": vars(cfg), "skipped": n_skipped,
                                           "seconds": seconds[m]}, "wb")
            if cfg.init_from != "scratch":
                where = os.path.join(cfg.out_dir, "hf" if m == stages[-1] else f"hf-{m}")
                common.export_hf(model, tok, where, cfg.export_dtype, state)

    if cfg.workers == 2:  # both methods at once, each in a process of its own (and on a core of its own)
        if not (ck and ck["stage"] == "side by side"):  # a new stage 1: what resume needs to find it
            for m in methods:
                if os.path.exists(common.checkpoint_path(cfg, m)):
                    os.remove(common.checkpoint_path(cfg, m))  # another run's
            common.write_atomic(os.path.join(cfg.out_dir, "ckpt.pt"),
                                {"stage": "side by side", "step": 0, "config": vars(cfg)}, "wb")
        try:
            failed = parallel.side_by_side(distilled, methods)
        except KeyboardInterrupt:  # every process got it; each keeps its last checkpoint
            common.die(f"interrupted: --init_from=resume continues both methods from their checkpoints in "
                       f"{cfg.out_dir}", code=130)
        if failed:
            m, code = failed
            common.die(f"the {m} process failed (exit code {code}), so the run stops; --init_from=resume "
                       f"continues both methods from their checkpoints in {cfg.out_dir}", code=1)
    for m in methods:
        if cfg.workers == 1 and stages.index(m) >= at:  # not finished before an interruption
            distilled(m)
        else:  # trained in a process of its own, or before an interruption: its file
            result = common.load_checkpoint(saved(m))
            parallel.load_full_state(model, result["model"])
            skipped[m], seconds[m] = result["skipped"], result.get("seconds", 0.0)
        evaluated(m)
    if RANK != 0:
        parallel.close()
        return
    common.report(results)

    common.write_atomic(os.path.join(cfg.out_dir, "completions.jsonl"),
                        "".join(json.dumps(r) + "\n" for _, records in results.values() for r in records))
    images = {name: os.path.join(cfg.out_dir, f"{name}.png") for name in ("reliability", "curves")}
    common.reliability_diagram(results, images["reliability"])
    common.training_curves([(cfg.out_dir, common.read_metrics(metrics))], images["curves"])
    seconds["total"] = time.time() - t_start
    common.write_json(os.path.join(cfg.out_dir, "results.json"),
                      {"config": vars(cfg), "models": {n: m for n, (m, _) in results.items()},
                       "skipped_updates": skipped, "seconds": seconds})
    finish(images)
    print(f"\nwrote {cfg.out_dir}/results.json, reliability.png, curves.png, completions.jsonl, "
          f"metrics.jsonl in {seconds['total']:.0f}s")
    parallel.close()

if __name__ == "__main__":
    main(sys.argv[1:])
