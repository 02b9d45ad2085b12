"""
One question through one distillation step, printed: what OPD and CaOPD train on, side by side.

    python one_step.py                       # the toy (its base from out/, trained there if missing)
    python one_step.py --smoke=True          # a 40-step toy base: seconds, numbers of a weak model
    python one_step.py --question=3 --K=16   # step 0's fourth question, more rollouts
    python one_step.py --init_from=Qwen/Qwen3-0.6B --enable_thinking=false --max_new_tokens=256

It prints the student's prompt, the K rollouts with their verdicts and P_acc, then for each method
the teacher's context and the completion trained on (the first rollout's), and per completion
token the student's and the teacher's probability of that token and the divergence between their
distributions there; at the confidence position, both distributions' most likely values. Every
train_small.py setting can be given; nothing is trained or written but the toy's cached base.
"""
import os
import random
import sys
from types import SimpleNamespace

import torch

import caopd
import cli
import models
import parallel
import questions
import toy_base
import train_small
from tokenizer import confidence_value_ids, decode, end_id, is_toy

# settings: one_step's own (train_small.py's can be given too)
# one_step
question = -1              # the n-th question stage 1 draws at step 0; -1: the first whose rollouts are mixed
# -----------------------------------------------------------------------------
OWN = cli.settings_block(globals(), __file__)

def distributions(net, prompt, completion, teacher_prompt, kind, beta):
    """Per completion token: the student's and the teacher's log-probabilities (L, V) of the token
    there, on the same tokens after their own prompts, and the divergence (L,) between them."""
    d = parallel.inner(net)
    with torch.no_grad():
        hs, _ = d.hidden(d.student, [prompt], [completion])
        ht, _ = d.hidden(d.teacher, [teacher_prompt], [completion])
        logp_s = (hs[0] @ caopd.output_weight(d.student).T).float().log_softmax(-1)  # (L, V)
        logp_t = (ht[0] @ caopd.output_weight(d.teacher).T).float().log_softmax(-1)
    return logp_s, logp_t, caopd.kl_divergence(logp_s, logp_t, kind, beta)

def confidence_position(tok, completion):
    """The index of the completion token that begins the stated value (None if it states none)."""
    for j in range(len(completion)):
        if caopd.parse_confidence(decode(tok, completion[:j + 1])) is not None:
            return j
    return None

def show(tok, name, logp_s, logp_t, kl, completion, at):
    print(f"  {'token':>14s} {'p student':>10s} {'p teacher':>10s} {'KL':>8s}")
    for j, t in enumerate(completion):
        mark = "  <- the confidence" if j == at else ""
        text = "<end>" if t == end_id(tok) else repr(decode(tok, [t]))
        print(f"  {text:>14s} {logp_s[j, t].exp().item():10.3f} {logp_t[j, t].exp().item():10.3f} "
              f"{kl[j].item():8.3f}{mark}")
    if at is None:
        print(f"  ({name}'s completion states no confidence)")
        return
    if is_toy(tok):  # every value is one token: the two distributions over 0.0 ... 1.0
        ids = confidence_value_ids(tok)
        print("  at the confidence, over the values " + " ".join(f"{v / 10:.1f}" for v in range(11)))
        for who, lp in (("student", logp_s), ("teacher", logp_t)):
            print(f"    {who:8s} " + " ".join(f"{lp[at, i].exp().item():.2f}" for i in ids))
    else:
        for who, lp in (("student", logp_s), ("teacher", logp_t)):
            top = lp[at].exp().topk(5)
            print(f"    {who}'s most likely first tokens of the value: " + ", ".join(
                f"{decode(tok, [i])!r} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))

def main(argv):
    given = cli.parse_overrides(argv, {**OWN, **train_small.SETTINGS}, lambda: cli.print_help(
        OWN, "python one_step.py [--key=value ...]", __doc__.strip().split("\n\n")[0],
        also=("train_small.py's settings", train_small.SETTINGS)))
    n = given.pop("question", question)
    if given.get("init_from") == "resume":
        cli.die("--init_from=resume: one_step.py starts from a base model (scratch or a Hugging Face model)")
    cfg = train_small.settings(**{**given, "method": "caopd"})
    cli.check([(n >= -1, "question", "must be >= 0, or -1 (the first question with mixed rollouts)")],
              SimpleNamespace(question=n))
    cfg.device, cfg.workers = cli.resolve_device(cfg.device), 1
    cfg.dtype = cli.resolve_dtype(cfg.dtype, cfg.device)
    torch.set_num_threads(cfg.threads)
    files = None if cfg.task == "arith" else questions.read_task_files(cfg)
    model, tok, context, _ = models.load_model(cfg)
    held, sample_train, verify = questions.load_task(cfg, tok, files, context)
    if cfg.smoke and "max_new_tokens" not in given:  # a real tokenizer's answers take more tokens than the toy's
        cfg.max_new_tokens = max(cfg.max_new_tokens, questions.answer_tokens(cfg, tok, held)[0])
    questions.check_lengths(cfg, tok, held, context)
    if cfg.base_steps:  # the toy: the base a run with these settings trains (cached in out_dir)
        if not os.path.exists(toy_base.cache_path(cfg, model, cfg.out_dir)):
            print(f"no base of these settings in {cfg.out_dir}: training it (stage 0, {cfg.base_steps} steps)")
        os.makedirs(cfg.out_dir, exist_ok=True)
        toy_base.cached_base(cfg, model, tok, sample_train, cfg.out_dir)
    net = train_small.distiller(cfg, model)
    exs = sample_train(random.Random(cfg.seed + 1), max(cfg.prompts_per_step, n + 1))  # as distill draws them
    prompts, sampled = train_small.rollouts(cfg, net, tok, exs, 0, (0, len(exs) * cfg.K))  # 1. step 0's rollouts
    texts = [decode(tok, r) for r in sampled]
    correct = [verify(exs[i // cfg.K], t) for i, t in enumerate(texts)]  # 2. verify
    if n == -1:  # the first question some of whose rollouts are right and some wrong, else the first
        n = next((q for q in range(len(exs)) if 0 < sum(correct[q * cfg.K:(q + 1) * cfg.K]) < cfg.K), 0)
    ex, rows = exs[n], slice(n * cfg.K, (n + 1) * cfg.K)
    prompts, sampled, texts, correct = prompts[rows], sampled[rows], texts[rows], correct[rows]
    print(f"\nquestion {n} of step 0 (--question=N for another)")
    print(f"the student's prompt:\n{decode(tok, prompts[0])}")
    print(f"{cfg.K} rollouts at temperature {cfg.temperature} (reference: {ex['reference']!r}):")
    for t, ok in zip(texts, correct):
        print(f"  {'right' if ok else 'wrong'}  {t!r}")
    for method in ("opd", "caopd"):  # 3. targets, then 4. the loss on them
        completions, teacher_prompts, p_acc, _ = train_small.targets(cfg, tok, method, [ex], sampled, texts, correct)
        print(f"\n===== {method.upper()}: P_acc = {sum(correct)} / {cfg.K} = {p_acc[0]:.3f}")
        print(f"the teacher's prompt:\n{decode(tok, teacher_prompts[0])}")
        print(f"the completion trained on (rollout 1): {decode(tok, completions[0])!r}")
        logp_s, logp_t, kl = distributions(net, prompts[0], completions[0], teacher_prompts[0], cfg.loss, cfg.jsd_beta)
        print(f"per token, the {cfg.loss} divergence between student and teacher over the whole vocabulary (their "
              f"mean, {kl[cfg.skip_tokens:].mean().item():.3f}, is this completion's loss):")
        show(tok, method, logp_s, logp_t, kl, completions[0], confidence_position(tok, completions[0]))

if __name__ == "__main__":
    main(sys.argv[1:])
