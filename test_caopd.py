"""Tests pinning down what readers of caopd.py get wrong. Run: python -m pytest -q test_caopd.py"""
import contextlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import bench
import caopd
import captured as captured_step
import cli
import experiments
import hf
import memory
import metrics_log
import models
import questions
import report
import tokenizer
import toy_base
from data import arith, tasks
from data.science import prepare as science
from data.tooluse import prepare as tooluse

HERE = os.path.dirname(os.path.abspath(__file__))
ENC = caopd.toy_tokenizer(arith.VOCAB_TEXT)

# -----------------------------------------------------------------------------
# metrics on hand-computed cases

def test_metrics_hand_case_with_a_tie():
    m = caopd.calibration_metrics([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.6])
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.5, rel=0, abs=1e-12)
    assert m["mean_confidence"] == pytest.approx(0.575, rel=0, abs=1e-12)
    assert m["ocg"] == pytest.approx(0.075, rel=0, abs=1e-12)
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.16 + 0.36) / 4, rel=0, abs=1e-12)
    # pairs (correct, incorrect): (.9,.2) (.9,.6) (.6,.2) win, (.6,.6) ties: strict SPR 3/4, AUROC 3.5/4
    assert m["spr"] == pytest.approx(0.75, rel=0, abs=1e-12)
    assert m["auroc"] == pytest.approx(0.875, rel=0, abs=1e-12)
    # bins: {.9: acc 1} -> .1 * 1/4; {.2: acc 0} -> .2 * 1/4; {.6, .6: acc .5} -> .1 * 2/4
    assert m["ece"] == pytest.approx(0.025 + 0.05 + 0.05, rel=0, abs=1e-12)

def test_metrics_constant_confidence_model():
    m = caopd.calibration_metrics([1, 0, 0, 1, 1], [1.0] * 5)
    assert m["spr"] == 0.0 and m["auroc"] == 0.5  # always 1.00: no ranking at all
    assert m["ece"] == pytest.approx(0.4, rel=0, abs=1e-12) and m["ocg"] == pytest.approx(0.4, rel=0, abs=1e-12)
    assert m["brier"] == pytest.approx(0.4, rel=0, abs=1e-12)

def test_metrics_empty_classes():
    for correct in ([1, 1, 1], [0, 0, 0]):
        m = caopd.calibration_metrics(correct, [0.2, 0.5, 0.9])
        assert m["spr"] == 0.0 and m["auroc"] == 0.5
    assert caopd.calibration_metrics([1, 1], [1.0, 1.0])["ece"] == 0.0

def test_metrics_bin_edges():
    assert caopd.calibration_metrics([0, 1], [0.0, 1.0])["ece"] == 0.0  # 0 in the first bin, 1 in the last
    # 0.3 belongs to [0.3, 0.4) together with 0.39 (floating point must not push it into [0.2, 0.3))
    assert caopd.calibration_metrics([1, 0], [0.3, 0.39])["ece"] == pytest.approx(abs(0.345 - 0.5), rel=0, abs=1e-12)
    assert caopd.calibration_metrics([1, 0], [0.7, 0.79])["ece"] == pytest.approx(abs(0.745 - 0.5), rel=0, abs=1e-12)

def test_ece_floor_is_the_ece_of_calibrated_draws():
    c = torch.tensor([i % 11 / 10 for i in range(997)], dtype=torch.float64)
    y = torch.rand(200, len(c), generator=torch.Generator().manual_seed(0), dtype=torch.float64) < c  # the same draws
    eces = torch.tensor([caopd.calibration_metrics(y[r].double(), c)["ece"] for r in range(200)], dtype=torch.float64)
    mean, sd = report.ece_floor(c.tolist())
    assert mean == pytest.approx(eces.mean().item(), rel=0, abs=1e-12) and sd == pytest.approx(eces.std().item(), abs=1e-12)
    assert report.ece_floor([0.0, 1.0] * 50) == (0.0, 0.0)  # a calibrated model saying only 0 or 1 is never off

def test_metrics_match_exact_rational_arithmetic():
    """1,001 answers at random tenths: each metric against exact fractions, to 1e-12 (a count / n in
    float32, as ECE once had, is off by ~5e-9)."""
    import random
    from fractions import Fraction
    rng = random.Random(0)
    conf = [rng.randrange(11) / 10 for _ in range(1001)]
    correct = [int(rng.random() < c * 0.8 + 0.1) for c in conf]
    m = caopd.calibration_metrics(correct, conf)
    n, C, Y = len(conf), [Fraction(c) for c in conf], [Fraction(y) for y in correct]
    by_bin = {}
    for c, y, x in zip(C, Y, conf):
        by_bin.setdefault(min(9, int(round(x * 10))), []).append(c - y)
    ece = sum(abs(sum(d)) for d in by_bin.values()) / n  # share x |mean conf - acc| = |sum(c - y)| / n
    pos = [c for c, y in zip(C, correct) if y]
    neg = [c for c, y in zip(C, correct) if not y]
    wins, ties = sum(p > q for p in pos for q in neg), sum(p == q for p in pos for q in neg)
    exact = {"accuracy": sum(Y) / n, "mean_confidence": sum(C) / n, "ece": ece,
             "brier": sum((c - y) ** 2 for c, y in zip(C, Y)) / n, "ocg": (sum(C) - sum(Y)) / n,
             "spr": Fraction(wins, len(pos) * len(neg)), "auroc": Fraction(2 * wins + ties, 2 * len(pos) * len(neg))}
    for k, v in exact.items():
        assert m[k] == pytest.approx(float(v), rel=0, abs=1e-12), k

# -----------------------------------------------------------------------------
# the loss: exact against plain autograd, in the right direction

def _case(N=37, d_s=8, d_t=6, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, d_s, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(V, d_s, dtype=torch.float64, generator=g, requires_grad=True)
    ht = torch.randn(N, d_t, dtype=torch.float64, generator=g)
    wt = torch.randn(V, d_t, dtype=torch.float64, generator=g)
    return hs, ws, ht, wt

MASKS = {
    "none": None,
    "bool, first chunk all masked": torch.arange(37) >= 7,
    "float weights": torch.linspace(0.1, 2.0, 37, dtype=torch.float64) * (torch.arange(37) % 3 != 0),
}

@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3), ("jsd", 0.9),
                                       ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_loss_and_gradients_match_autograd(kind, beta, mask):
    hs, ws, ht, wt = _case()
    m = MASKS[mask]
    fused = caopd.fused_linear_kl(hs, ws, ht, wt, m, kind, beta, chunk_size=7)  # 37 = 5 * 7 + 2
    g_fused = torch.autograd.grad(fused, (hs, ws))
    ref = caopd.linear_kl_reference(hs, ws, ht, wt, m, kind, beta)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    assert abs(fused.item() - ref.item()) <= 1e-10 * abs(ref.item())
    for a, b in zip(g_fused, g_ref):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()

def test_jsd_endpoints_follow_the_reference_convention():
    hs, ws, ht, wt = _case()
    for beta, kind in ((0.0, "forward"), (1.0, "reverse")):
        a = caopd.fused_linear_kl(hs, ws, ht, wt, kind="jsd", beta=beta)
        b = caopd.fused_linear_kl(hs, ws, ht, wt, kind=kind)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)

def test_kl_direction_on_a_hand_case():
    # student p_s = [.7, .2, .1], teacher p_t = [.25, .25, .5]; identity weights make logits = log p
    ps, pt = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64), torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    reverse = caopd.fused_linear_kl(ps.log(), eye, pt.log(), eye, kind="reverse").item()
    forward = caopd.fused_linear_kl(ps.log(), eye, pt.log(), eye, kind="forward").item()
    # KL(student || teacher) = .7 ln(.7/.25) + .2 ln(.2/.25) + .1 ln(.1/.5)
    assert reverse == pytest.approx(0.7 * math.log(2.8) + 0.2 * math.log(0.8) + 0.1 * math.log(0.2))
    assert reverse == pytest.approx(0.515161, abs=1e-6)
    # KL(teacher || student) = .25 ln(.25/.7) + .25 ln(.25/.2) + .5 ln(.5/.1)
    assert forward == pytest.approx(0.603100, abs=1e-6)

def test_teacher_gets_no_gradient_and_masked_rows_none():
    hs, ws, ht, wt = _case()
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    mask = torch.arange(37) < 20
    caopd.fused_linear_kl(hs, ws, ht, wt, mask).backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad[20:].abs().max() == 0 and hs.grad[:20].abs().max() > 0
    hs.grad = None
    caopd.fused_linear_kl(hs, ws, ht, wt, torch.zeros(37, dtype=torch.bool)).backward()
    assert hs.grad.abs().max() == 0

def test_fused_float32_at_qwen_vocab_is_as_exact_as_unfused():
    V, N, d = 151_936, 24, 32
    g = torch.Generator().manual_seed(0)
    hs64, ws64 = torch.randn(N, d, dtype=torch.float64, generator=g), torch.randn(V, d, dtype=torch.float64, generator=g) * 0.3
    ht64, wt64 = torch.randn(N, d, dtype=torch.float64, generator=g), torch.randn(V, d, dtype=torch.float64, generator=g) * 0.3
    def run(fn, dtype):
        hs, ws = hs64.to(dtype).requires_grad_(), ws64.to(dtype).requires_grad_()
        loss = fn(hs, ws, ht64.to(dtype), wt64.to(dtype))
        return [loss.double()] + [t.double() for t in torch.autograd.grad(loss, (hs, ws))]
    exact = run(caopd.linear_kl_reference, torch.float64)
    fused = run(caopd.fused_linear_kl, torch.float32)
    unfused = run(caopd.linear_kl_reference, torch.float32)
    for e, f, u in zip(exact, fused, unfused):
        err_f, err_u = (f - e).abs().max().item(), (u - e).abs().max().item()
        assert err_f <= 1.5 * err_u + 1e-12, (err_f, err_u)

@pytest.mark.parametrize("bad,match", [
    (dict(teacher_hidden=torch.randn(5, 6)), r"want 2-D .* teacher_hidden \(5, 6\)"),
    (dict(teacher_weight=torch.randn(49, 6)), r"teacher_weight \(49, 6\)"),
    (dict(mask=torch.ones(36)), r"mask \(36,\)"),
    (dict(student_hidden=torch.ones(37, 8, dtype=torch.long)), r"student_hidden \(37, 8\) torch.int64"),
    (dict(kind="kl"), "kind must be"),
    (dict(beta=1.5), "beta must be in"),
])
def test_fused_bad_input(bad, match):
    hs, ws, ht, wt = (t.detach().float() for t in _case())
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        caopd.fused_linear_kl(**args)

# -----------------------------------------------------------------------------
# teacher, replacements, tokenizer, sampler, verifier

def test_ema_update_moves_teacher_toward_student():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    caopd.ema_update(teacher, student, 0.01)
    assert all(torch.allclose(p, torch.full_like(p, 0.01)) for p in teacher.parameters())  # not 0.99
    caopd.ema_update(teacher, student, 0.0)
    assert all(torch.allclose(p, torch.full_like(p, 0.01)) for p in teacher.parameters())  # a = 0: frozen

def _parabola(shown, sigma=0.15):
    values = torch.linspace(0, 1, 11, dtype=torch.float64)
    return -(values[None] - torch.tensor(shown, dtype=torch.float64)[:, None]) ** 2 / (2 * sigma ** 2)  # (n, 11)

def test_soft_confidence_loss_is_smallest_at_the_parabola():
    shown = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    z = (_parabola(shown.tolist()) + 3.0).requires_grad_()  # logits: the parabola plus any constant
    loss = toy_base.soft_confidence_loss(z.log_softmax(-1), shown, 0.15, 0.1)
    loss.backward()
    w = _parabola(shown.tolist()).softmax(-1)
    assert loss.item() == pytest.approx(-(w * w.log()).sum().item(), abs=1e-9)  # the entropy: shape error 0
    assert z.grad.abs().max().item() < 1e-9  # a minimum
    # flat logits: cross-entropy -log(1/11) per row, plus 0.1 x the mean square of the centred parabola
    p = _parabola(shown.tolist())
    by_hand = 3 * math.log(11) + 0.1 * (p - p.mean(1, keepdim=True)).pow(2).mean(1).sum().item()
    flat = toy_base.soft_confidence_loss(torch.zeros(3, 11, dtype=torch.float64).log_softmax(-1), shown, 0.15, 0.1)
    assert flat.item() == pytest.approx(by_hand, rel=1e-9)

def _student_toward(teachers, share, steps=3000):
    """The confidence distribution that minimizes sum_i share_i x reverse KL(s || teachers_i)."""
    z = torch.zeros(11, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    logp_t = teachers.log_softmax(-1)
    for _ in range(steps):
        opt.zero_grad()
        loss = (torch.tensor(share, dtype=torch.float64) * caopd.kl_divergence(
            z.log_softmax(-1).expand_as(logp_t), logp_t, "reverse")).sum()
        loss.backward()
        opt.step()
    return z.softmax(-1)

def test_reverse_kl_toward_parabola_teachers_says_the_mean_p_acc():
    """Why the base teacher's confidence is trained soft (soft_confidence_loss): 30% of some questions
    have P_acc 0, 70% P_acc 1; a student that cannot tell them apart should say 0.7. Toward teachers
    whose log-probabilities are parabolas it does; toward teachers with flat tails (hard targets) it
    says 1.0, the more common end."""
    s = _student_toward(_parabola([0.0, 1.0]), [0.3, 0.7])
    assert s.argmax().item() == 7
    hard = torch.full((2, 11), -6.0, dtype=torch.float64)
    hard[0, 0] = hard[1, 10] = 0.0  # all mass on the shown value, the same floor everywhere else
    assert _student_toward(hard, [0.3, 0.7]).argmax().item() == 10

def test_confidence_values_are_single_tokens():
    for i in range(11):
        text = f"Answer: 12\nConfidence: {i / 10:.1f}"
        tokens = ENC.encode(text)
        assert ENC.decode([tokens[-1]]) == f" {i / 10:.1f}"
        assert ENC.decode(tokens) == text
    assert ENC.decode(ENC.encode("odd text: €")) == "odd text: €"  # anything else still encodes, by bytes

EX = {"id": "017+305", "question": "Solve 017+305 and end with your confidence.", "answer": 322,
      "reference": "Answer: 322", "kind": "add"}

def test_a_beta_prior_estimator_and_the_stated_decimals():
    """What empirical_confidence's docstring says: the target is P_acc rounded to the stated digits, so
    with K = 8 and the toy's one decimal a Beta(2, 2) prior gives c = 0 and c = 1 the same target."""
    beta = lambda correct: (sum(correct) + 2) / (len(correct) + 4)
    said = [caopd.set_confidence("Answer: 1", beta([1] * c + [0] * (8 - c)), 1) for c in (0, 1, 2)]
    assert said == ["Answer: 1\nConfidence: 0.2", "Answer: 1\nConfidence: 0.2", "Answer: 1\nConfidence: 0.3"]
    assert caopd.set_confidence("", beta([0] * 8), 2) != caopd.set_confidence("", beta([1] + [0] * 7), 2)  # X.XX

def test_the_three_replacements_on_a_real_toy_prompt():
    rollouts, correct = ["Answer: 322\nConfidence: 0.9"] * 8, [1, 0, 0, 1, 0, 1, 0, 0]
    completions, context, p_acc = caopd.distillation_targets("caopd", rollouts, correct, EX["reference"], "demo",
                                                             arith.DECIMALS)
    assert p_acc == 0.375
    assert completions == ["Answer: 322\nConfidence: 0.4"] * 8  # a. the student completion
    same, opd_context, _ = caopd.distillation_targets("opd", rollouts, correct, EX["reference"], "demo", arith.DECIMALS)
    assert same == rollouts  # plain OPD trains on its rollouts as sampled
    opd = caopd.teacher_prompt(EX["question"], arith.DECIMALS, **opd_context)
    ca = caopd.teacher_prompt(EX["question"], arith.DECIMALS, **context)
    assert opd == ("Solve 017+305 and end with your confidence.\nThis is an example for a response to the question:\n"
                   "Answer: 322\nConfidence: 1.0\nNow answer with a response of your own.\n")
    assert ca == ("Solve 017+305 and end with your confidence.\nThis is an example for a response to the question:\n"
                  "Answer: 322\nConfidence: 0.4\n"  # b. the demonstrated confidence
                  "Note: The empirical confidence for this question is 0.4. Output this exact value in the "
                  "'Confidence:' field.\n"  # c. the Note line
                  "Now answer with a response of your own.\n")
    # the edited completion continues the student prompt token by token and ends in one confidence token
    assert ENC.decode(ENC.encode(completions[0])[-1:]) == " 0.4"

@pytest.mark.parametrize("parts", ["", "a", "b", "c", "ab", "ac", "bc"])
def test_each_replacement_alone_and_left_out(parts):
    rollouts, correct = ["Answer: 322\nConfidence: 0.9", "Answer: 321\nConfidence: 0.8"], [1, 0]
    completions, context, p_acc = caopd.distillation_targets("caopd", rollouts, correct, EX["reference"], "demo", 1,
                                                             parts=parts)
    assert p_acc == 0.5
    if "a" in parts:
        assert completions == ["Answer: 322\nConfidence: 0.5", "Answer: 321\nConfidence: 0.5"]
    else:
        assert completions == rollouts
    assert context == dict(template="demo", solution=EX["reference"], confidence=0.5 if "b" in parts else 1.0,
                           note=0.5 if "c" in parts else None)

def test_the_replacements_on_the_correct_solution_template():
    rollouts = ["Answer: 321\nConfidence: 0.9", "Answer: 322\nConfidence: 0.2", "Answer: 322\nConfidence: 0.3"]
    _, opd_context, _ = caopd.distillation_targets("opd", rollouts, [0, 1, 1], EX["reference"], "correct_solution", 2)
    _, context, p = caopd.distillation_targets("caopd", rollouts * 8, [0, 1, 1] * 3 + [0] * 15, EX["reference"],
                                               "correct_solution", 2)
    assert opd_context["solution"] is rollouts[1] and context["solution"] is rollouts[1]  # the first verified one
    assert p == 0.25
    opd = caopd.teacher_prompt(EX["question"], 2, **opd_context)
    ca = caopd.teacher_prompt(EX["question"], 2, **{**context, "confidence": 0.625, "note": 0.625})
    assert opd == ("Solve 017+305 and end with your confidence.\nCorrect solution:\nAnswer: 322\nConfidence: 1.00\n"
                   "Correctly solve the original question.\n")  # a verified rollout's own confidence is replaced
    assert "Correct solution:\nAnswer: 322\nConfidence: 0.62\n" in ca  # .2f of 0.625 (round half even)
    assert "Note: The empirical confidence for this question is 0.62." in ca
    assert "0.2" not in ca.replace("0.62", "")
    _, none_right, _ = caopd.distillation_targets("caopd", rollouts, [0, 0, 0], EX["reference"], "correct_solution", 2)
    assert none_right["solution"] is EX["reference"]  # no verified rollout: the reference

def test_set_confidence_without_a_confidence_line():
    assert caopd.set_confidence("Answer: 3", 0.5, 1) == "Answer: 3\nConfidence: 0.5"
    assert caopd.set_confidence("Answer: 3\nConfidence: 0.9 Confidence: 0.1", 0.5, 1) == "Answer: 3\nConfidence: 0.5"
    assert caopd.set_confidence("", 1.0, 2) == "Confidence: 1.00"

def rollout_batch(cfg, net, tok, method, exs, verify, step, rows):
    """Steps 1-3 of train_small's distillation step: (prompts, completions, teacher prompts, texts,
    verdicts, P_acc per question, sampled tokens)."""
    import train_small
    prompts, sampled = train_small.rollouts(cfg, net, tok, exs, step, rows)
    texts = [tokenizer.decode(tok, r) for r in sampled]
    correct = [verify(exs[i // cfg.K], t) for i, t in enumerate(texts)]
    completions, teacher_prompts, p_acc, _ = train_small.targets(cfg, tok, method, exs, sampled, texts, correct)
    return prompts, completions, teacher_prompts, texts, correct, p_acc, sum(map(len, sampled))

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return caopd.GPT(caopd.GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()

def test_kv_cache_sampling_equals_full_forward_greedy():
    model = _tiny_model()
    prompts = [ENC.encode((arith.QUESTION.format(a=a, op="+", b=b) + "\n")) for a, b in [(1, 2), (34, 5), (999, 0)]]
    with_cache = caopd.sample(model, prompts, 20, ENC.eot_token, temperature=0)
    without = caopd.sample(model, prompts, 20, ENC.eot_token, temperature=0, decoder=bench.full_forward_decoder)
    assert with_cache == without and all(len(c) == 20 for c in with_cache)  # random weights: no early END
    # and the cached hidden state of every new token equals the full forward's
    seq = torch.tensor([prompts[0] + with_cache[0]])
    full = model(seq)
    cache = model.new_cache(1, seq.shape[1])
    steps = [model(seq[:, :len(prompts[0])], cache)[:, -1]]
    steps += [model(seq[:, t:t + 1], cache, t)[:, -1] for t in range(len(prompts[0]), seq.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, len(prompts[0]) - 1:], rtol=1e-5, atol=1e-5)

def test_sampler_stops_at_end_and_samples_with_temperature_and_top_k():
    model = _tiny_model()
    prompt = ENC.encode((EX["question"] + "\n"))
    with torch.no_grad():  # make END the most likely token after the prompt
        h = model(torch.tensor([prompt]))[0, -1]
        model.wte.weight[ENC.eot_token] = 100 * h / h.norm()
    out = caopd.sample(model, [prompt] * 4, 10, ENC.eot_token, temperature=1.0, top_k=1)
    assert out == [[ENC.eot_token]] * 4
    g = torch.Generator().manual_seed(0)
    a = caopd.sample(_tiny_model(), [prompt] * 4, 6, ENC.eot_token, 1.0, generator=g)
    b = caopd.sample(_tiny_model(), [prompt] * 4, 6, ENC.eot_token, 1.0, generator=torch.Generator().manual_seed(0))
    assert a == b and len({tuple(x) for x in a}) > 1  # seeded, and the rows differ

def test_completion_hidden_shares_prompts_exactly():
    # 2 questions x 3 rollouts: each prompt runs once; states and gradients equal one full forward per row
    model = _tiny_model().double()
    prompts = [[5, 6, 7]] * 3 + [[8, 9, 4]] * 3
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18], [19, 20], [21]]
    h, lens = caopd.completion_hidden(model, prompts, completions)
    assert lens == [3, 1, 2, 3, 2, 1]
    (h[:, :2] ** 2).sum().backward()  # row 1's and row 5's second column is padding, but still a function of the input
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        full = model(torch.tensor([p + c[:-1]]))[0, len(p) - 1:]  # (len(c), C)
        torch.testing.assert_close(h[i, :len(c)], full, rtol=1e-10, atol=1e-10)
        padded = model(torch.tensor([p + c[:-1] + [0] * (3 - len(c))]))[0, len(p) - 1:len(p) + 1]
        total = total + (padded ** 2).sum()
    total.backward()
    for a, b in zip(shared, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

def test_completion_hidden_predicts_each_completion_token():
    model = _tiny_model()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    h, lens = caopd.completion_hidden(model, prompts, completions)
    assert h.shape == (2, 4, 32) and lens == [4, 1]
    full = model(torch.tensor([[5, 6, 7, 10, 11, 12]]))
    torch.testing.assert_close(h[0], full[0, 2:6])
    torch.testing.assert_close(h[1, 0], model(torch.tensor([[8, 9]]))[0, 1])

@pytest.mark.parametrize("text,ok", [
    ("Answer: 322\nConfidence: 0.7", True), ("Answer: 322", True), ("Answer:322", True),
    ("", False), ("Answer:", False), ("Answer: abc", False), ("Answer: 3 22", False), ("Answer: 3220", False),
    ("Confidence: 0.9\nAnswer: 322", False), ("322", False), ("Answer: 321\nAnswer: 322", False),
    ("\x00\xff garbage Answer", False),
])
def test_verifier_on_malformed_output(text, ok):
    assert caopd.verify_arith(EX["answer"], text) is ok

@pytest.mark.parametrize("text,value", [
    ("Answer: 3", None), ("Answer: 3\nConfidence:", None), ("Confidence: high", None),
    ("Confidence: 0.7", 0.7), ("Confidence: 0.2\nConfidence: 0.9", 0.9), ("Confidence: 1.7", 1.0),
    ("Confidence: 85%", 0.85), ("Confidence: .5", 0.5), ("Confidence:0.30", 0.3), ("Confidence: -0.3", 0.0),
    ("Confidence: 0.4 Confidence: garbage", 0.4), ("Confidence: 120%", 1.0),
    # as chat models write it: any letter case, markdown emphasis, trailing punctuation
    ("confidence: 0.7", 0.7), ("CONFIDENCE: 0.7", 0.7), ("**Confidence:** 0.9", 0.9), ("**Confidence**: 0.9", 0.9),
    ("Confidence: **0.9**", 0.9), ("**Confidence: 0.9**", 0.9), ("*confidence*: 0.9", 0.9), ("__Confidence__: 0.9", 0.9),
    ("_Confidence_: 0.9", 0.9), ("***Confidence:*** 0.9", 0.9), ("Confidence: 0.9.", 0.9), ("Confidence: 85%.", 0.85),
    ("**Confidence:** 85%", 0.85), ("Confidence: **high**", None), ("**Confidence:**", None), ("confidence: high", None),
    ("Confidence: 0.2\n**confidence:** 0.8", 0.8), ("**Confidence:** 0.3\nConfidence: none", 0.3),
])
def test_parse_confidence(text, value):
    assert caopd.parse_confidence(text) == value

# a Qwen-style markdown answer to the science task, and the same answer as the toy writes its own
CHAT_ANSWER = ("<reasoning>\nCCO is ethanol, C2H6O: **46.069 g/mol**.\n</reasoning>\n<answer>\nB\n</answer>\n\n"
               "{label} 0.85\n\nLet me know if you need anything else.")
LABELS = ["Confidence:", "confidence:", "CONFIDENCE:", "**Confidence:**", "**Confidence**:", "*confidence*:",
          "__Confidence__:", "_Confidence_:", "***Confidence:***"]

@pytest.mark.parametrize("label", LABELS)
def test_every_spelling_is_read_and_replaced_on_chat_text(label):
    text = CHAT_ANSWER.format(label=label)
    assert caopd.parse_confidence(text) == 0.85
    assert tasks.verify_science("B", text)
    completions, _, p_acc = caopd.distillation_targets("caopd", [text] * 8, [1, 1, 1, 0, 0, 0, 0, 0], "", "demo", 2)
    completion = completions[0]
    # the answer is kept, the label (its emphasis too) and all after it replaced: one confidence line
    assert completion == "<reasoning>\nCCO is ethanol, C2H6O: **46.069 g/mol**.\n</reasoning>\n<answer>\nB\n</answer>\n\nConfidence: 0.38"
    assert caopd.parse_confidence(completion) == 0.38 and len(caopd.CONFIDENCE.findall(completion)) == 1
    ca = caopd.teacher_prompt(QUESTION, 2, "demo", text, p_acc, p_acc)  # the demonstrated solution's value too
    assert "</answer>\n\nConfidence: 0.38\nNote: The empirical confidence for this question is 0.38." in ca
    assert "0.85" not in ca and "Let me know" not in ca

@pytest.mark.parametrize("label", LABELS)
def test_every_spelling_is_read_and_replaced_on_toy_text(label):
    text = f"Answer: 0322\n{label} 0.9"
    assert caopd.parse_confidence(text) == 0.9 and caopd.verify_arith(322, text)
    assert caopd.set_confidence(text, 0.4, 1) == "Answer: 0322\nConfidence: 0.4"
    assert caopd.set_confidence(f"Answer: 0322 {label} 0.9", 0.4, 1) == "Answer: 0322 \nConfidence: 0.4"
    assert caopd.split_confidence(text) == ("Answer: 0322\n", f"{label} 0.9")
    assert not caopd.verify_arith(322, f"{label} 0.9\nAnswer: 0322")  # an answer after the label is not read

def test_a_label_without_a_number_is_replaced_too():
    assert caopd.set_confidence("Answer: 0322\n**Confidence:** high", 0.5, 1) == "Answer: 0322\nConfidence: 0.5"
    assert caopd.split_confidence("no label here") == ("no label here", "")

def test_caopd_rollout_with_a_markdown_label_is_reencoded_with_one_confidence_line(monkeypatch):
    import train_small
    cfg = train_small.settings(smoke=True, method="caopd", K=2)
    ex = {**EX, "messages": [{"role": "user", "content": EX["question"]}]}
    said = ["Answer: 0322\n**confidence:** 0.9", "Answer: 0321\nConfidence: **0.2**."]  # right, wrong: P_acc 0.5
    monkeypatch.setattr(caopd, "sample", lambda *a, **k: [ENC.encode(t) + [ENC.eot_token] for t in said])
    verify = lambda ex, text: caopd.verify_arith(ex["answer"], text)
    _, completions, teacher_prompts, texts, correct, p_acc, sampled = rollout_batch(
        cfg, caopd.Distiller(None, None), ENC, "caopd", [ex], verify, 0, (0, 2))
    assert texts == said and correct == [True, False] and p_acc == [0.5]
    assert sampled == sum(len(ENC.encode(t)) + 1 for t in said)  # the sampled tokens, end tokens included
    assert [ENC.decode(c[:-1]) for c in completions] == ["Answer: 0322\nConfidence: 0.5", "Answer: 0321\nConfidence: 0.5"]
    assert all(c[-1] == ENC.eot_token and ENC.decode(c[-2:-1]) == " 0.5" for c in completions)  # one value token
    assert "Answer: 322\nConfidence: 0.5\nNote: The empirical confidence for this question is 0.5." in ENC.decode(teacher_prompts[0])

def test_out_of_range_confidence_is_clipped_and_counted():
    assert caopd.parse_confidence("Confidence: 1.7", clip=False) == 1.7
    assert caopd.parse_confidence("Confidence: -0.3", clip=False) == -0.3
    assert caopd.parse_confidence("Confidence: 0.3", clip=False) == 0.3

def test_split_is_deterministic_and_held_out():
    held, sample_train = arith.split(3, 200)
    assert [e["id"] for e in held] == [e["id"] for e in arith.split(3, 200)[0]]
    import random
    ids = {e["id"] for e in held}
    assert not ids & {e["id"] for e in sample_train(random.Random(0), 2000)}
    assert len({len(ENC.encode((e["question"] + "\n"))) for e in held}) == 1  # one batch

def test_held_out_questions_that_run_out_are_an_error_not_a_hang(monkeypatch):
    # 1-2 digit products: 10,000 ids, of which exactly 1954 are held out with data_seed 0
    assert sum(arith.is_held(0, f"{a:03d}*{b:03d}") for a in range(100) for b in range(100)) == 1954
    monkeypatch.setattr(arith, "MAX_DRAWS", 500_000)  # enough to find all 1954, in 3 s instead of 10
    assert len({e["id"] for e in arith.split(0, 1954, "*")[0]}) == 1954
    with pytest.raises(ValueError, match=r"^n_eval=1955: 500,000 questions .* hold 1954 distinct held-out ones; "
                                         r"ask for at most that many$"):
        arith.split(0, 1955, "*")

# -----------------------------------------------------------------------------
# the paper's two tasks: release converters, verifiers, the row loader


SYSTEM = (  # the release's system message, verbatim
    '\nGiven a question and four options, please select the right answer. Respond in the following '
    'format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\nFor the answer, only output '
    'the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate '
    'the answer text. For example, if the answer is "A", just output:\n<answer>\nA\n</answer>\n')
QUESTION = ("What is the molar weight (g/mol) of the molecule with the canonical SMILES representation "
            "'CCO'?\n\nA: 44.053\nB: 46.069\nC: 32.042\nD: 60.052")
DEMO = "<reasoning>\nCCO is ethanol, C2H6O: 46.069 g/mol.\n</reasoning>\n<answer>\nB\n</answer>"
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
ASKED = [CHAT[0], {"role": "user", "content": QUESTION + science.ASK_CONFIDENCE}]  # our rows ask for a confidence

TOOL_PROMPT = ("Your task is to answer the user's question using available tools. \nYou have access to the "
               "following tools:\nName: WeatherNow\nDescription: Weather\nDocumentation:\ngetForecast: ...\n\n"
               "Use the following format:\nThought: ...\nAction: ...\nAction Input: ...\n\nBegin!\n"
               "Question: A 3-day forecast for Denver?")
TOOL_ROW = {"prompt": TOOL_PROMPT, "name": "WeatherNow", "description": "Weather",
            "nl_documentation": "getForecast: ...\n", "instruction": "A 3-day forecast for Denver?",
            "golden_answer": [{"Action": "getForecast", "Action_Input": '{"city": "Denver", "days": 3}'},
                              {"Action": "getCurrentWeather", "Action_Input": '{"city": "Denver"}'}],
            "golden_response": ["Thought: a forecast.\nAction: getForecast\nAction Input: {\"city\": \"Denver\", \"days\": 3}",
                                "Thought: and now.\nAction: getCurrentWeather\nAction Input: {\"city\": \"Denver\"}"]}

# ----------------------------------------------------------------------------
# science converters

def test_science_train_row():
    row = {"messages": CHAT, "output_text": DEMO}
    assert science.convert_train_row(row, 4) == {"id": "train-4", "messages": ASKED, "answer": "B", "reference": DEMO}

def test_science_train_row_drops_assistant_turn_and_reads_last_tag():
    demo = "<answer>A</answer> on second thought\n<answer>\n c \n</answer>"
    row = {"messages": CHAT + [{"role": "assistant", "content": demo}], "output_text": demo}
    got = science.convert_train_row(row, 0)
    assert got["messages"] == ASKED and got["answer"] == "C" and got["reference"] == demo

@pytest.mark.parametrize("row, message", [
    ({"messages": CHAT, "output_text": "<reasoning>no tag</reasoning>"}, "science train row 7: no <answer>"),
    ({"messages": CHAT, "output_text": "<answer>AB</answer>"}, "science train row 7: no <answer>"),
    ({"messages": CHAT}, "science train row 7: missing or non-string field 'output_text'"),
    ({"output_text": DEMO}, "science train row 7: missing field 'messages'"),
    ({"messages": [CHAT[0]], "output_text": DEMO}, "science train row 7: 'messages': no user message"),
])
def test_science_train_row_errors(row, message):
    with pytest.raises(ValueError, match=message):
        science.convert_train_row(row, 7)

def test_science_eval_row():
    assert science.convert_eval_row({"prompt": CHAT, "answer": "D"}, 12) == {
        "id": "eval-12", "messages": ASKED, "answer": "D", "reference": "<answer>D</answer>"}

@pytest.mark.parametrize("row, message", [
    ({"prompt": CHAT}, "science eval row 3: field 'answer'"),
    ({"prompt": CHAT, "answer": "AB"}, "science eval row 3: field 'answer'"),
    ({"answer": "A"}, "science eval row 3: missing field 'prompt'"),
    ({"prompt": [{"role": "user"}], "answer": "A"}, r"science eval row 3: 'prompt'\[0\]"),
])
def test_science_eval_row_errors(row, message):
    with pytest.raises(ValueError, match=message):
        science.convert_eval_row(row, 3)

# ----------------------------------------------------------------------------
# tool-use converter

TOOL_CALLS = [{"action": "getForecast", "action_input": {"city": "Denver", "days": 3}},
              {"action": "getCurrentWeather", "action_input": {"city": "Denver"}}]

def test_tooluse_train_row_keeps_every_call_and_joins_the_response():
    assert tooluse.convert_row(TOOL_ROW, 5, "train") == {
        "id": "train-5", "messages": [{"role": "user", "content": tooluse.ask_confidence(TOOL_PROMPT)}],
        "answer": {"action": "getForecast", "action_input": {"city": "Denver", "days": 3}, "calls": TOOL_CALLS},
        "reference": "\n".join(TOOL_ROW["golden_response"])}
    five = {**TOOL_ROW, "golden_answer": [{"Action": f" f{i} ", "Action_Input": f'{{"k": {i}}}'} for i in range(5)]}
    assert tooluse.convert_row(five, 0, "train")["answer"]["calls"] == [{"action": f"f{i}", "action_input": {"k": i}}
                                                                        for i in range(5)]

def test_tooluse_confidence_line_goes_into_the_format_block():
    content = tooluse.ask_confidence(TOOL_PROMPT)
    assert "Action Input: ...\nConfidence: your confidence, from 0.00 to 1.00" in content
    assert content.endswith("\n\nBegin!\nQuestion: A 3-day forecast for Denver?")

def test_tooluse_eval_row_without_response():
    row = {k: v for k, v in TOOL_ROW.items() if k != "golden_response"}
    got = tooluse.convert_row(row, 0, "eval")
    assert got["id"] == "eval-0" and got["answer"]["calls"] == TOOL_CALLS
    assert got["reference"] == ('Action: getForecast\nAction Input: {"city": "Denver", "days": 3}\n'
                                'Action: getCurrentWeather\nAction Input: {"city": "Denver"}')  # every call, in order
    assert tasks.verify_tooluse(got["answer"], got["reference"])
    assert tasks.verify_tooluse_all_calls(got["answer"], got["reference"])

@pytest.mark.parametrize("change, message", [
    ({"golden_response": None}, "tooluse train row 9: missing field 'golden_response'"),
    ({"prompt": None}, "tooluse train row 9: missing or empty field 'prompt'"),
    ({"golden_answer": []}, "tooluse train row 9: field 'golden_answer'"),
    ({"golden_answer": [{"Action": "", "Action_Input": "{}"}]}, r"tooluse train row 9: golden_answer\[0\] has no 'Action'"),
    ({"golden_answer": [{"Action": "f", "Action_Input": "{city: Paris}"}]}, "tooluse train row 9: .*'Action_Input'.* not JSON"),
    ({"golden_answer": [{"Action": "f", "Action_Input": "[1]"}]}, "tooluse train row 9: .*not a JSON object"),
    # a later call is checked as the first one is
    ({"golden_answer": [{"Action": "f", "Action_Input": "{}"}, {"Action": "g", "Action_Input": "{x}"}]},
     r"tooluse train row 9: golden_answer\[1\]\['Action_Input'\] is not JSON"),
    ({"golden_answer": [{"Action": "f", "Action_Input": "{}"}, {"Action_Input": "{}"}]},
     r"tooluse train row 9: golden_answer\[1\] has no 'Action'"),
    ({"golden_answer": [{"Action": "f", "Action_Input": "{}"}, "g"]}, r"tooluse train row 9: golden_answer\[1\] is not a call"),
])
def test_tooluse_row_errors(change, message):
    row = {k: v for k, v in {**TOOL_ROW, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        tooluse.convert_row(row, 9, "train")

def test_download_release_is_pinned(monkeypatch, tmp_path):
    urls = []
    monkeypatch.setattr(tasks.urllib.request, "urlretrieve", lambda url, dst: urls.append(url))
    tasks.download_release(science.RELEASE_DIR, str(tmp_path / "science_data"))
    assert len(urls) == 6 and all(tasks.COMMIT in u and "/data/science_data/" in u for u in urls)

def test_prepare_converts_a_local_release_and_is_idempotent(tmp_path, monkeypatch, capsys):
    import types
    release = {"train": [{"messages": CHAT, "output_text": DEMO}], "eval": [{"prompt": CHAT, "answer": "D"}] * 2}
    fake = types.ModuleType("datasets")  # the release's load_from_disk, without the package
    fake.load_from_disk = lambda path: release[os.path.basename(path).split("_")[0]]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    convert = lambda row, i, split: (science.convert_train_row if split == "train" else science.convert_eval_row)(row, i)
    tasks.prepare("science", science.RELEASE_DIR, convert, str(tmp_path), [str(tmp_path / "clone")])
    assert "science train: 1 rows" in capsys.readouterr().out
    assert [r["answer"] for r in tasks.load_rows(str(tmp_path / "eval.jsonl"), "science")] == ["D", "D"]
    tasks.prepare("science", science.RELEASE_DIR, convert, str(tmp_path), [])  # outputs exist: no download
    assert "exist; delete them to rebuild" in capsys.readouterr().out

def test_write_jsonl_atomic(tmp_path):
    path = str(tmp_path / "out.jsonl")
    rows = [tooluse.convert_row(TOOL_ROW, 0, "train")]
    tasks.write_jsonl_atomic(path, rows)
    assert os.listdir(tmp_path) == ["out.jsonl"] and tasks.load_rows(path, "tooluse") == rows

# ----------------------------------------------------------------------------
# verify_science

@pytest.mark.parametrize("text, ok", [
    (DEMO, True),
    ("<answer>B</answer>", True),
    ("<ANSWER> b </answer>", True),
    ("<answer>\nB\n</answer>\nConfidence: 0.80", True),
    ("<answer>A</answer> no wait <answer>B</answer>", True),   # the last tag counts
    ("<answer>B</answer> no wait <answer>A</answer>", False),
    ("<answer>B</answer> then <answer>A", True),              # an unclosed tag is no tag
    ("<answer>A</answer>", False),
    ("<answer>B or C</answer>", False),                        # one letter only
    ("<answer>46.069</answer>", False),
    ("<answer></answer>", False),
    ("The answer is B.", False),
    ("", False),
])
def test_verify_science(text, ok):
    assert tasks.verify_science("B", text) is ok

# ----------------------------------------------------------------------------
# verify_tooluse

WANT = {"action": "searchBooks", "action_input": {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}}

@pytest.mark.parametrize("text, ok", [
    ('Thought: search.\nAction: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}\nConfidence: 0.7', True),
    ('Action: searchBooks\nAction Input: {"limit": 3, "filters": {"language": "fr"}, "query": "chemistry"}', True),   # key order
    ('Action:  searchBooks  \nAction Input:\n```json\n{"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}\n```', True),
    ('Action: searchBooks\nAction_Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}', True),
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}\n'
     'Action: getBookByIsbn\nAction Input: {"isbn": "1"}', True),                                                     # first call counts
    ('Action: getBookByIsbn\nAction Input: {"isbn": "1"}\n'
     'Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}', False),
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "en"}, "limit": 3}', False),  # nested value
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": "3"}', False),  # type
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}}', False),              # missing key
    ('Action: search_books\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}', False),
    ('Action: searchBooks\nConfidence: 0.9', False),                                                                  # no Action Input
    ('Action Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3}\nAction: searchBooks', False),  # input before action
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3,}', False),  # invalid JSON
    ('Action: searchBooks\nAction Input: {"query": "chemistry", "filters": {"language": "fr"}, "limit": 3', False),   # never closes
    ('Action: searchBooks\nAction Input: query=chemistry {"limit": 3}', False),                                       # not an object
    ("", False),
])
def test_verify_tooluse(text, ok):
    assert tasks.verify_tooluse(WANT, text) is ok

def test_verify_tooluse_braces_and_quotes_inside_strings():
    want = {"action": "searchBooks", "action_input": {"query": '"{curly} brackets}" in C', "limit": 3}}
    text = 'Action: searchBooks\nAction Input: {"query": "\\"{curly} brackets}\\" in C", "limit": 3}\nConfidence: 0.4'
    assert tasks.verify_tooluse(want, text)
    assert not tasks.verify_tooluse(want, text.replace("in C", "in D"))

def test_verify_tooluse_never_raises_on_deep_nesting():
    assert tasks.verify_tooluse({"action": "f", "action_input": {}}, "Action: f\nAction Input: " + "{" * 5000 + "}" * 5000) is False
    assert tasks.verify_tooluse({"action": "f", "action_input": {}}, "Action: f\nAction Input: {}") is True

# ----------------------------------------------------------------------------
# verify_tooluse_all_calls: every golden call, as the authors' eval_tooluse.py scores a row

TWO = {**TOOL_CALLS[0], "calls": TOOL_CALLS}  # getForecast {city, days}, then getCurrentWeather {city}
FORECAST = 'Action: getForecast\nAction Input: {"city": "Denver", "days": 3}'
NOW = 'Action: getCurrentWeather\nAction Input: {"city": "Denver"}'

@pytest.mark.parametrize("text, first, every", [
    (f"Thought: a forecast.\n{FORECAST}\nObservation: ...\nThought: and now.\n{NOW}\nConfidence: 0.8", True, True),
    (f"{NOW}\n{FORECAST}", False, True),                      # another order: the names are a multiset
    (FORECAST, True, False),                                  # the first call alone: right for training, not here
    (f"{FORECAST}\n{NOW}\n{NOW}", True, False),                # each call counts: one too many
    (f"{FORECAST}\n{FORECAST}", True, False),
    (f"{FORECAST}\n{NOW}\nAction: getAlerts\nAction Input: {{}}", True, False),
    # merged inputs: which input goes with which call is not checked
    ('Action: getForecast\nAction Input: {"city": "Denver"}\nAction: getCurrentWeather\nAction Input: {"days": 3}', False, True),
    ('Action: getForecast\nAction: getCurrentWeather\nAction Input: {"days": 3, "city": "Denver"}', True, True),
    (f"{FORECAST}\n{NOW.replace('Denver', 'Boulder')}", True, False),   # a later call's key overwrites the first's
    (f"{FORECAST.replace('3', '2')}\n{NOW}", False, False),
    (f'{FORECAST.replace("3", chr(34) + "3" + chr(34))}\n{NOW}', False, False),  # "3" is not 3
    # an input that is not a JSON object is left out of the merge (the name still counts)
    (f"{FORECAST}\nAction: getCurrentWeather\nAction Input: {{city: Denver}}", True, True),
    (f'Action: getForecast\nAction Input: {{"city": "Denver", "days": 3,}}\n{NOW}', False, False),
    (f"{FORECAST}\nAction: getCurrentWeather\nAction Input: {{\"city\": \"Denver\"", True, True),  # never closes
    ('Action:  getForecast \nAction_Input:\n```json\n{"city": "Denver", "days": 3}\n```\n' + NOW, True, True),
    ("", False, False),
    (f"{FORECAST}\n{NOW}".replace("Action:", "action:"), False, False),  # the label is case-sensitive, as theirs
])
def test_verify_tooluse_all_calls(text, first, every):
    assert tasks.verify_tooluse(TWO, text) is first
    assert tasks.verify_tooluse_all_calls(TWO, text) is every

def test_all_calls_order_matters_only_through_the_merge():
    cities = ["Oslo", "Rome", "Cairo"]  # three calls of one action: the merged golden input is {"city": "Cairo"}
    calls = [{"action": "getCurrentWeather", "action_input": {"city": c}} for c in cities]
    answer = {**calls[0], "calls": calls}
    said = lambda *order: "\n".join(f'Action: getCurrentWeather\nAction Input: {{"city": "{c}"}}' for c in order)
    assert tasks.verify_tooluse_all_calls(answer, said("Oslo", "Rome", "Cairo"))
    assert tasks.verify_tooluse_all_calls(answer, said("Rome", "Oslo", "Cairo"))  # the last one decides
    assert not tasks.verify_tooluse_all_calls(answer, said("Oslo", "Cairo", "Rome"))
    assert tasks.verify_tooluse_all_calls(answer, said("Cairo", "Cairo", "Cairo"))  # what the merge cannot see
    assert not tasks.verify_tooluse_all_calls(answer, said("Cairo"))

def test_all_calls_with_nested_and_empty_inputs_never_raises():
    nested = {"action": "searchBooks", "action_input": WANT["action_input"], "calls": [WANT]}
    assert tasks.verify_tooluse_all_calls(nested, 'Action: searchBooks\nAction Input: {"query": "chemistry", '
                                                  '"filters": {"language": "fr"}, "limit": 3}')
    empty = {"action": "f", "action_input": {}, "calls": [{"action": "f", "action_input": {}}]}
    assert tasks.verify_tooluse_all_calls(empty, "Action: f") and tasks.verify_tooluse_all_calls(empty, "Action: f\nAction Input: {}")
    assert tasks.verify_tooluse_all_calls(empty, "Action: f\nAction Input: " + "{" * 5000 + "}" * 5000)  # not JSON: left out
    assert not tasks.verify_tooluse_all_calls(empty, "Action: f\nAction Input: {\"x\": 1}")

def test_evaluate_reports_both_tool_use_scores(monkeypatch):
    import train_small
    rows = tasks.load_rows(os.path.join(HERE, "data", "tooluse", "fixture.jsonl"), "tooluse")
    two = rows[12]  # getCurrentWeather Lisbon, then getForecast Lisbon
    calls = two["reference"].split("\nThought: ")
    said = [two["reference"] + "\n**Confidence:** 0.9",          # every call: right both ways
            calls[0] + "\nConfidence: 0.6",                         # the first call only
            "Action: getForecast\nAction Input: {}\nconfidence: 20%"]  # neither
    monkeypatch.setattr(caopd, "sample", lambda *a, **k: [ENC.encode(t) + [ENC.eot_token] for t in said])
    cfg = train_small.settings(init_from="unused", task="tooluse")
    verify = lambda ex, text: tasks.verify_tooluse(ex["answer"], text)
    m, records = train_small.evaluate(cfg, caopd.Distiller(None, None), ENC, "caopd", [two] * 3, verify)
    assert [r["correct"] for r in records] == [True, True, False]
    assert [r["correct_all_calls"] for r in records] == [True, False, False]
    assert [r["confidence"] for r in records] == [0.9, 0.6, 0.2]
    assert m["accuracy"] == pytest.approx(2 / 3) and m["all_calls"]["accuracy"] == pytest.approx(1 / 3)
    a = m["all_calls"]
    assert a["mean_confidence"] == m["mean_confidence"] == pytest.approx(1.7 / 3) and a["n"] == 3
    assert a["brier"] == pytest.approx((0.1 ** 2 + 0.6 ** 2 + 0.2 ** 2) / 3)  # against the all-calls verdicts
    assert m["brier"] == pytest.approx((0.1 ** 2 + 0.4 ** 2 + 0.2 ** 2) / 3)  # against the first-call ones
    assert a["spr"] == 1.0 and a["ece"] == pytest.approx((0.1 + 0.6 + 0.2) / 3) and m["format_rate"] == 1.0

# ----------------------------------------------------------------------------
# load_task_rows

SCIENCE_ROW = {"id": "x", "messages": CHAT, "answer": "B", "reference": DEMO}
TOOL_OK = {"id": "x", "messages": [{"role": "user", "content": "q"}],
           "answer": {"action": "f", "action_input": {}, "calls": [{"action": "f", "action_input": {}}]},
           "reference": "Action: f\nAction Input: {}"}

def write(tmp_path, *lines):
    path = str(tmp_path / "rows.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path

def test_load_rows_skips_blank_lines(tmp_path):
    path = write(tmp_path, "", json.dumps(SCIENCE_ROW), "  ", json.dumps({**SCIENCE_ROW, "id": "y"}))
    assert [r["id"] for r in tasks.load_rows(path, "science")] == ["x", "y"]

def test_load_rows_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        tasks.load_rows(str(tmp_path / "nope.jsonl"), "science")
    path = write(tmp_path, "", "  ")
    with pytest.raises(ValueError, match=r"rows\.jsonl: empty file"):
        tasks.load_rows(path, "science")

@pytest.mark.parametrize("task, bad, message", [
    ("science", "{not json", "malformed JSON"),
    ("science", json.dumps([SCIENCE_ROW]), "a row must be a JSON object"),
    ("science", json.dumps({k: v for k, v in SCIENCE_ROW.items() if k != "reference"}), "missing field 'reference'"),
    ("science", json.dumps({**SCIENCE_ROW, "id": 3}), "'id' must be a non-empty string"),
    ("science", json.dumps({**SCIENCE_ROW, "messages": "hi"}), "'messages' must be a non-empty list"),
    ("science", json.dumps({**SCIENCE_ROW, "messages": CHAT + [{"role": "assistant", "content": "B"}]}), r"messages\[2\] must be"),
    ("science", json.dumps({**SCIENCE_ROW, "messages": [{"role": "user", "content": 5}]}), r"messages\[0\] must be"),
    ("science", json.dumps({**SCIENCE_ROW, "messages": [CHAT[0]]}), "'messages' has no user message"),
    ("science", json.dumps({**SCIENCE_ROW, "answer": "b"}), "'answer' must be one uppercase letter"),
    ("science", json.dumps({**SCIENCE_ROW, "answer": "AB"}), "'answer' must be one uppercase letter"),
    ("science", json.dumps({**SCIENCE_ROW, "reference": None}), "'reference' must be a string"),
    ("science", json.dumps(SCIENCE_ROW), "duplicate id 'x' \\(first on line 1\\)"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": {"action": "f", "action_input": "{}"}}), "'answer' must be"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": {"action_input": {}}}), "'answer' must be"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": "f"}), "'answer' must be"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": {"action": "f", "action_input": {}}}),
     "'answer' has no 'calls' .*delete it and run data/tooluse/prepare.py again"),  # a file from before
    ("tooluse", json.dumps({**TOOL_OK, "answer": {**TOOL_OK["answer"], "calls": []}}), "'answer' must be"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": {**TOOL_OK["answer"], "calls": [{"action": "f"}]}}), "'answer' must be"),
    ("tooluse", json.dumps({**TOOL_OK, "answer": {**TOOL_OK["answer"], "calls": [{"action": "g", "action_input": {}}]}}),
     "'answer': its 'action' and 'action_input' must be its first call"),
])
def test_load_rows_errors_name_file_and_line(tmp_path, task, bad, message):
    first = json.dumps(SCIENCE_ROW if task == "science" else TOOL_OK)
    path = write(tmp_path, first, "", bad)  # the bad row is on line 3
    with pytest.raises(ValueError, match=f"rows\\.jsonl:3: {message}"):
        tasks.load_rows(path, task)

# ----------------------------------------------------------------------------
# fixtures: small real-format files for tests that train a few steps

@pytest.mark.parametrize("task, verify, n", [("science", tasks.verify_science, 12), ("tooluse", tasks.verify_tooluse, 15),
                                             ("tooluse", tasks.verify_tooluse_all_calls, 15)])
def test_fixture_loads_and_its_references_verify(task, verify, n):
    folder = os.path.dirname(os.path.abspath((science if task == "science" else tooluse).__file__))
    rows = tasks.load_rows(os.path.join(folder, "fixture.jsonl"), task)
    assert len(rows) == n
    assert task == "tooluse" or all(r["messages"][0] == {"role": "system", "content": SYSTEM} for r in rows)
    assert task == "science" or [len(r["answer"]["calls"]) for r in rows] == [1] * 12 + [2, 3, 2]
    assert all(verify(r["answer"], r["reference"]) for r in rows)
    assert not any(verify(r["answer"], rows[(i + 1) % n]["reference"]) for i, r in enumerate(rows)
                   if r["answer"] != rows[(i + 1) % n]["answer"])

# -----------------------------------------------------------------------------
# the script: bad settings, and one end-to-end smoke run

def _run(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)

def _main(capsys, *args):
    """train_small.main in this process (no new interpreter: fast): (exit code, stdout, stderr)."""
    import train_small
    with pytest.raises(SystemExit) as e:
        train_small.main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err

@pytest.mark.parametrize("arg,words", [
    ("--nope=1", "unknown setting 'nope'"), ("--K=eight", "--K must be a int"), ("--K=0", "--K=0"),
    ("--temperature=-1", "--temperature=-1.0"), ("--ema_rate=1.5", "--ema_rate=1.5"),
    ("--smoke=maybe", "--smoke must be a bool"), ("--method=grpo", "--method='grpo'"), ("K=3", "--key=value"),
    ("--min_lr=0.1", "--min_lr=0.1"), ("--eval_every=-1", "--eval_every=-1"),
    # nonsense that used to run and report ECE 0.000, or die with a traceback
    ("--temperature=inf", "--temperature=inf: must be a finite number"), ("--lr=inf", "--lr=inf: must be a finite"),
    ("--lr=nan", "--lr=nan: must be a finite"), ("--jsd_beta=-inf", "--jsd_beta=-inf: must be a finite"),
    ("--max_new_tokens=1", "--max_new_tokens=1: too short for the answer format"),
    ("--max_new_tokens=11", "takes 12 tokens"),
    ("--block_size=16", "--block_size=16: shorter than the toy's longest sequence"),
    ("--threads=0", "--threads=0: must be >= 1"), ("--n_eval=0", "--n_eval=0: must be >= 1"),
    ("--log_every=0", "--log_every=0"), ("--grad_clip=0", "--grad_clip=0.0"),
    ("--enable_thinking=maybe", "--enable_thinking='maybe': must be 'default', 'true' or 'false'"),
    ("--enable_thinking=True", "--enable_thinking='True': must be"),
    ("--compile_decode=yes", "--compile_decode='yes': must be 'auto', 'true' or 'false'"),
    ("--eval_batch=-1", "--eval_batch=-1: must be >= 0"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, arg, words):
    code, out, err = _main(capsys, arg, f"--out_dir={tmp_path / 'out'}")
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written, not even an empty folder

@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_that_is_not_there(tmp_path, capsys, device):
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    code, out, err = _main(capsys, f"--device={device}", f"--out_dir={tmp_path / 'out'}")
    assert code == 2 and f"--device='{device}'" in err and "not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

def test_help_lists_every_setting_with_its_default_and_comment():
    import train_small
    for script, settings in (("train_small.py", train_small.SETTINGS), ("experiments.py", experiments.OWN)):
        r = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith(f"usage: python {script}")
        flat = " ".join(r.stdout.split())
        for name, (default, text, group) in settings.items():
            assert f"--{name}={default} " in flat + " " and " ".join(text.split()) in flat, name
            assert text and f"{group}:" in r.stdout, name  # every setting has its comment, under its group
    assert "--lr=0.0003 at the first step, then cosine to min_lr" in " ".join(r.stdout.split())  # train_small's, too
    text, group = train_small.SETTINGS["ema_rate"][1:]
    assert text == "teacher <- (1 - a) teacher + a student after every step; 0 = a frozen teacher" and group == "teacher"

def test_help_into_a_closed_pipe_exits_0_without_a_traceback():
    """`--help | head`: the reader leaves early. Here it has left before the first byte (a pipe whose
    read end is closed), so every write fails: the run still exits 0 and says nothing on stderr."""
    for script in ("train_small.py", "experiments.py"):
        read, write = os.pipe()
        os.close(read)
        r = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120)
        os.close(write)
        assert r.returncode == 0 and r.stderr == "", (script, r.stderr[-300:])

def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    r = _run(f"--out_dir={f}", "--smoke=True")
    assert r.returncode == 2 and "is a file" in r.stderr and f.read_text() == "x"

def test_conflicting_and_indivisible_settings(tmp_path, capsys):
    code, _, err = _main(capsys, "--task=science", f"--out_dir={tmp_path / 'a'}")
    assert code == 2 and "--task='science'" in err and "--init_from" in err
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), "--prompts_per_step=3",
                        f"--out_dir={tmp_path / 'b'}"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "--prompts_per_step=3: must be divisible by the 2 processes" in r.stderr
    code, _, err = _main(capsys, "--K=3", "--init_from=resume", f"--out_dir={tmp_path / 'c'}")
    assert code == 2 and "no checkpoint to resume from" in err
    assert not any(tmp_path.rglob("*"))

def test_unwritable_out_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _run(f"--out_dir={tmp_path / 'file' / 'out'}", "--smoke=True")
    assert r.returncode == 2 and "cannot be created" in r.stderr and r.stdout.count("\n") <= 2

def test_a_second_run_into_a_locked_out_dir_is_refused(tmp_path, capsys):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "lock", "w") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        code, _, err = _main(capsys, "--smoke=True", f"--out_dir={out}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--out_dir='{out}' is in use by the run of process 4242" in err
    assert [p.name for p in out.iterdir()] == ["lock"]  # nothing written

# metrics.jsonl of a --smoke run: every stage prints every log_every = 8 steps and its last; then each
# model's final evaluation
SMOKE_LINES = [*(("train", "base", s) for s in (0, 8, 16, 24, 32, 39)), ("eval", "base", 40),
               *(x for m in ("opd", "caopd") for x in [*(("train", m, s) for s in (0, 3)), ("eval", m, 4)])]
COMMON_FIELDS = {"kind", "stage", "method", "step", "time", "peak_memory_mib"}
BASE_FIELDS = COMMON_FIELDS | {"loss", "lr", "grad_norm", "train_tokens_per_s"}
TRAIN_FIELDS = BASE_FIELDS | {"rollout_accuracy", "p_acc", "stated_confidence", "teacher_shown", "format_rate", "skipped",
                              "rollout_tokens_per_s"}
EVAL_FIELDS = COMMON_FIELDS | {"final"}  # and the held-out metrics of results.json
UNTIMED = ("time", "peak_memory_mib", "rollout_tokens_per_s", "train_tokens_per_s")  # differ from run to run

def _metrics(out, timed=False, file_order=False):
    """metrics.jsonl's lines by stage (each stage's in file order): side by side (--workers=2, the
    default on 2 cores) the two methods' processes write their lines as they come."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r["kind"] != "run"]  # the run's header, its first line
    if not file_order:
        lines.sort(key=lambda r: ["base", "opd", "caopd"].index(r["stage"]))  # stable: within a stage, file order
    return lines if timed else [{k: v for k, v in r.items() if k not in UNTIMED} for r in lines]

def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = _run("--smoke=True", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"config", "seconds", "models", "differences", "skipped_updates"}
    assert res["skipped_updates"] == {"opd": 0, "caopd": 0}
    assert res["config"]["smoke"] is True and res["config"]["K"] == 4
    assert set(res["seconds"]) >= {"base", "opd", "caopd", "eval", "total"}
    assert set(res["models"]) == {"base", "opd", "caopd"}
    keys = {"accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "aurc", "n", "format_rate",
            "clipped_rate", "format_ok", "accuracy_at_50", "accuracy_at_80", "ci95"}
    for m in res["models"].values():
        assert set(m) == keys and m["n"] == 16 and m["format_ok"] is True
        for k, (low, high) in m["ci95"].items():  # every metric's interval holds its value
            assert low - 1e-12 <= m[k] <= high + 1e-12, k
    assert set(res["differences"]) == {"caopd - opd"}
    d = res["differences"]["caopd - opd"]["ece"]
    assert d["value"] == pytest.approx(res["models"]["caopd"]["ece"] - res["models"]["opd"]["ece"], abs=1e-12)
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 16 and {"model", "completion", "correct", "confidence"} <= set(json.loads(lines[0]))
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # metrics.jsonl: a line per printed step (stage 0's, each method's) and per evaluation, in order
    records = _metrics(out, timed=True)
    assert [(x["kind"], x["stage"], x["step"]) for x in records] == SMOKE_LINES
    for x in records:
        assert set(x) == (EVAL_FIELDS | keys if x["kind"] == "eval" else BASE_FIELDS if x["stage"] == "base"
                          else TRAIN_FIELDS), x
        assert x["time"] >= 0 and x["peak_memory_mib"] > 0
        if x["kind"] == "eval":  # the final evaluations: results.json's
            assert x["final"] and {k: x[k] for k in keys} == res["models"][x["stage"]]
            continue
        assert x["lr"] > 0 and x["grad_norm"] > 0 and x["train_tokens_per_s"] > 0
        if x["stage"] != "base":  # the numbers of the printed line
            assert x["method"] == x["stage"] and x["rollout_tokens_per_s"] > 0 and x["skipped"] == 0
            assert f"{x['stage']:5s} step {x['step']:4d} | reverse KL {x['loss']:.4f} | rollout acc " \
                   f"{x['rollout_accuracy']:.3f} | P_acc {x['p_acc']:.3f} | stated conf " \
                   f"{x['stated_confidence']:.3f} | teacher shown {x['teacher_shown']:.3f} | format " \
                   f"{x['format_rate']:.2f}" in r.stdout
            assert x["teacher_shown"] == (1.0 if x["stage"] == "opd" else x["p_acc"])  # the change, in every line
    times = [x["time"] for x in _metrics(out, timed=True, file_order=True)]
    assert times == sorted(times)
    assert "opd   step" in r.stdout and "caopd step" in r.stdout
    assert "smoke run: every stage shrunk to seconds" in r.stdout and "its numbers mean nothing" in r.stdout
    assert "eval base" in r.stderr  # the evaluation's progress bar
    assert r.stdout.count("base step") <= 6 and "checkpoint: base" not in r.stdout  # stage 0 prints a few lines
    # the methods train differently: their steps' losses and their weights differ
    kl = {m: [l.split("|")[1] for l in r.stdout.splitlines() if l.startswith(f"{m:5s} step")] for m in ("opd", "caopd")}
    assert kl["opd"] != kl["caopd"] and len(kl["opd"]) == 2
    opd, ca = (torch.load(out / f"{m}.pt", weights_only=True)["model"] for m in ("opd", "caopd"))
    assert max((opd[k] - ca[k]).abs().max().item() for k in opd) > 1e-4
    # the base model is cached: a second run reuses it
    r2 = _run("--smoke=True", f"--out_dir={out}", "--method=caopd")
    assert r2.returncode == 0 and "reusing base model" in r2.stdout
    assert set(json.loads((out / "results.json").read_text())["models"]) == {"base", "caopd"}
    # a new run starts a new metrics.jsonl; a reused base is not trained, so it logs only its evaluation
    lines = _metrics(out, timed=True, file_order=True)  # (its first line, the run's header, left out)
    assert [(r["kind"], r["stage"], r["step"]) for r in lines] == [l for l in SMOKE_LINES if l[1] != "opd"][6:]

def test_smoke_questions_exercise_p_acc_and_the_correct_solution(tmp_path):
    """--smoke's student is right now and then: some questions have 0 < P_acc < 1, and the
    correct_solution context shows one of its verified rollouts, not the reference."""
    import random
    import train_small
    cfg = train_small.settings(smoke=True, teacher_context="correct_solution", out_dir=str(tmp_path), device="cpu")
    base, tok, context, _ = models.load_model(cfg)
    held, sample_train, verify = questions.load_task(cfg, tok, None, context)
    toy_base.cached_base(cfg, base, tok, sample_train, str(tmp_path))
    net, rng, p_acc, shown = train_small.distiller(cfg, base), random.Random(cfg.seed + 1), [], []
    for step in range(cfg.steps):  # distill's questions and rollouts
        exs = sample_train(rng, cfg.prompts_per_step)
        *_, texts, correct, p, _ = rollout_batch(cfg, net, tok, "caopd", exs, verify, step,
                                                             (0, cfg.prompts_per_step * cfg.K))
        p_acc += p
        for g, ex in enumerate(exs):
            group, ok = texts[g * cfg.K:(g + 1) * cfg.K], correct[g * cfg.K:(g + 1) * cfg.K]
            solution = caopd.distillation_targets("caopd", group, ok, ex["reference"], cfg.teacher_context, 1)[1]["solution"]
            if any(ok):
                shown.append(solution is group[ok.index(True)])
    assert any(0 < p < 1 for p in p_acc) and shown and all(shown)

# -----------------------------------------------------------------------------
# runs that survive: determinism, resume after SIGKILL, corrupt checkpoints, non-finite steps

RUN = ("--smoke=True", "--steps=24", "--ckpt_every=4", "--n_eval=16")

def _without_seconds(out):
    res = json.loads((out / "results.json").read_text())
    del res["seconds"], res["config"]["workers"]  # side by side or one after the other: the same numbers
    return res

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run; tests compare other runs with the same seed against it."""
    where = tmp_path_factory.mktemp("reference")
    r = _run(*RUN, "--out_dir=out", cwd=where)  # the same command in another folder: the same results
    assert r.returncode == 0, r.stderr[-2000:]
    return where / "out"

def test_the_captured_decode_step_gives_the_toy_the_same_run(reference_run, tmp_path):
    # --compile_decode=true: our GPT's compiled step (float32 rounding apart from the eager one) samples the
    # same rollouts and answers here; compiled once (the rollouts and the evaluation share its shapes)
    r = _run(*RUN, "--compile_decode=true", "--out_dir=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode step compiled" in r.stdout and r.stdout.count("compiled the rollouts' decode step in") == 1
    res, ref = _without_seconds(tmp_path / "out"), _without_seconds(reference_run)
    assert res.pop("config")["compile_decode"] == "true" and ref.pop("config")["compile_decode"] == "auto"
    assert res == ref
    assert (tmp_path / "out" / "completions.jsonl").read_bytes() == (reference_run / "completions.jsonl").read_bytes()

def test_same_seed_gives_identical_results_and_completions(reference_run, tmp_path):
    r = _run(*RUN, "--out_dir=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    assert _without_seconds(out) == _without_seconds(reference_run)
    assert (out / "results.json").read_text().split('"seconds"')[0] == \
        (reference_run / "results.json").read_text().split('"seconds"')[0]  # byte for byte, timings aside
    assert (out / "completions.jsonl").read_bytes() == (reference_run / "completions.jsonl").read_bytes()

def test_sigkill_in_stage_1_then_resume_gives_the_same_results(reference_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in reference_run.glob("base-*.pt"):  # the cached base: stage 0 is tested elsewhere
        (out / f.name).write_bytes(f.read_bytes())
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train_small.py"), *RUN, "--out_dir=out", "--workers=1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if "checkpoint: opd step 8" in line:
            p.kill()  # SIGKILL: no cleanup, no final checkpoint
            break
    p.wait(timeout=60)
    assert p.returncode == -9
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["stage"] in ("opd", "caopd") and ck["step"] < 24
    assert not (out / "results.json").exists()
    # metrics.jsonl keeps every line written before the kill, each whole; stage 0 was not trained here
    ref = [x for x in _metrics(reference_run) if x["stage"] != "base" or x["kind"] == "eval"]
    killed = _metrics(out)
    assert ("train", "opd", 0) in [(x["kind"], x["stage"], x["step"]) for x in killed]
    assert killed == ref[:len(killed)]
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as left by a kill in the middle of a write
    # a differing setting is refused, naming it; the interrupted command with --init_from=resume resumes
    r = _run(*RUN, "--K=3", "--out_dir=out", "--init_from=resume", cwd=tmp_path)
    assert r.returncode == 2 and "--K=3 (the run has 4)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run(*RUN, "--out_dir=out", "--init_from=resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {ck['stage']} at step {ck['step']}" in r.stdout
    assert f"the run of process {p.pid} ended without releasing it (killed?); taking it over" in r.stdout
    assert (out / "lock").read_text() == ""  # released at the end
    assert _without_seconds(out) == _without_seconds(reference_run)
    assert (out / "completions.jsonl").read_bytes() == (reference_run / "completions.jsonl").read_bytes()
    assert _metrics(out) == ref  # goes on from the checkpoint: no line missing, none twice, in order

def test_sigkill_after_stage_0_then_resume_keeps_metrics_whole(reference_run, tmp_path):
    """Killed in stage 1 before its first checkpoint: ckpt.pt still holds stage 0 (step 20), whose
    base is already cached, so the resumed run reuses it and starts OPD over. metrics.jsonl keeps
    stage 0's lines and its evaluation, and drops OPD's first steps, logged again."""
    run = ("--smoke=True", "--steps=24", "--ckpt_every=20", "--n_eval=16", "--workers=1")  # RUN, fewer checkpoints
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train_small.py"), *run, "--out_dir=out"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if line.startswith("opd   step    0"):
            p.kill()  # 20 steps before OPD's first checkpoint
            break
    p.wait(timeout=60)
    out = tmp_path / "out"
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert p.returncode == -9 and (ck["stage"], ck["step"]) == ("base", 20) and any(out.glob("base-*.pt"))
    assert ("train", "opd", 0) in [(x["kind"], x["stage"], x["step"]) for x in _metrics(out)]
    r = _run(*run, "--out_dir=out", "--init_from=resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming base at step 20" in r.stdout and "reusing base model" in r.stdout
    assert _metrics(out) == _metrics(reference_run)
    assert _without_seconds(out)["models"] == _without_seconds(reference_run)["models"]

def test_a_resumed_run_keeps_the_lines_before_its_checkpoint():
    import train_small
    lines = [{"kind": "train", "stage": "base", "step": 0}, {"kind": "train", "stage": "base", "step": 8},
             {"kind": "eval", "stage": "base", "step": 10, "final": True}]
    for m in ("opd", "caopd"):
        lines += [{"kind": "train", "stage": m, "step": s} for s in (0, 2, 4, 6)]
        lines += [{"kind": "eval", "stage": m, "step": s, "final": False} for s in (4, 8)]
        lines += [{"kind": "eval", "stage": m, "step": 8, "final": True}]
    def kept(stage, step, **more):
        return [(x["kind"], x["stage"], x["step"]) for x in lines
                if metrics_log.kept_on_resume(x, ["base", "opd", "caopd"], {stage: step, **more})]
    assert kept("base", 8) == [("train", "base", 0)]  # stage 0 goes on from step 8
    # OPD from step 4: its steps before 4 and the evaluation at 4 (before the checkpoint); the base's evaluation
    assert kept("opd", 4) == [("train", "base", 0), ("train", "base", 8), ("eval", "base", 10),
                              ("train", "opd", 0), ("train", "opd", 2), ("eval", "opd", 4)]
    assert kept("caopd", 0) == kept("opd", 4)[:3] + [(x["kind"], x["stage"], x["step"]) for x in lines[3:10]]
    assert kept("opd", 0) == kept("opd", 4)[:3]
    # side by side: each method from its own checkpoint
    assert kept("opd", 4, caopd=2) == kept("opd", 4) + [("train", "caopd", 0)]

def _children(pid):
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and os.path.exists(f"/proc/{d}/stat")
            and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid)]

@pytest.mark.parametrize("how", ["parent", "child", "ctrl-c"])
def test_side_by_side_stops_whole_and_resumes_to_the_same_results(reference_run, tmp_path, how):
    """--workers=2 (the default on a 2-core Linux machine): OPD and CaOPD in two processes. A SIGKILL
    to the run takes both along, one to a method's process stops the run with one line naming it,
    Ctrl-C stops all three; each way, the same command with --init_from=resume ends with the
    uninterrupted run's results."""
    import signal
    out = tmp_path / "out"
    out.mkdir()
    for f in reference_run.glob("base-*.pt"):
        (out / f.name).write_bytes(f.read_bytes())
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train_small.py"), *RUN, "--out_dir=out", "--workers=2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if "checkpoint: caopd step 8" in line:
            children = _children(p.pid)
            assert len(children) == 2
            if how == "parent":
                p.kill()
            elif how == "child":
                os.kill(children[1], signal.SIGKILL)
            else:
                os.killpg(p.pid, signal.SIGINT)  # what the terminal sends every process on Ctrl-C
            break
    err = p.communicate(timeout=60)[1]
    for _ in range(50):  # no process is left behind
        if not any(os.path.exists(f"/proc/{c}") and open(f"/proc/{c}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                   for c in children):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"a method's process outlived the run ({how})")
    if how == "child":
        last = err.strip().splitlines()[-1]  # (above it: the progress bars)
        assert p.returncode == 1 and re.search(r"error: the (opd|caopd) process failed \(exit code -9\)", last), err
        assert err.count("error") == 1 and "Traceback" not in err
    elif how == "ctrl-c":
        assert p.returncode == 130 and "error: interrupted: --init_from=resume continues" in err.strip().splitlines()[-1]
        assert "Traceback" not in err, err
    assert torch.load(out / "ckpt.pt", weights_only=True)["stage"] == "side by side"
    assert not (out / "results.json").exists()
    r = _run(*RUN, "--out_dir=out", "--workers=2", "--init_from=resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _without_seconds(out)["models"] == _without_seconds(reference_run)["models"]
    assert (out / "completions.jsonl").read_bytes() == (reference_run / "completions.jsonl").read_bytes()

def test_held_out_evaluations_during_distillation_change_nothing(reference_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in reference_run.glob("base-*.pt"):
        (out / f.name).write_bytes(f.read_bytes())
    r = _run(*RUN, "--eval_every=8", "--out_dir=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _without_seconds(reference_run)["models"]
    assert _without_seconds(out)["models"] == ref  # greedy evaluation draws no random numbers
    assert (out / "completions.jsonl").read_bytes() == (reference_run / "completions.jsonl").read_bytes()
    for m in ("opd", "caopd"):
        lines = [l for l in r.stdout.splitlines() if l.split()[:2] == [m, "step"] and "held-out" in l]
        assert [l.split()[2] for l in lines] == ["8", "16", "24"]
        assert f"ECE {ref[m]['ece']:.3f} | OCG {ref[m]['ocg']:+.3f}" in lines[-1]  # the last one is the final model
        # metrics.jsonl: each evaluation after the step it follows, and the final one
        evals = [(x["step"], x["final"]) for x in _metrics(out) if x["kind"] == "eval" and x["stage"] == m]
        assert evals == [(8, False), (16, False), (24, False), (24, True)]
    steps = [(x["kind"], x["stage"], x["step"]) for x in _metrics(out)]
    assert steps.index(("eval", "opd", 8)) == steps.index(("train", "opd", 0)) + 1

def test_truncated_or_corrupt_checkpoint_is_named(reference_run, tmp_path):
    data = (reference_run / "ckpt.pt").read_bytes()
    for bad in (data[:len(data) // 2], b"not a checkpoint at all"):
        (tmp_path / "ckpt.pt").write_bytes(bad)
        r = _run("--init_from=resume", f"--out_dir={tmp_path}")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert "ckpt.pt: the checkpoint is truncated or corrupt" in r.stderr

def _nan_on(calls, monkeypatch):
    """Make caopd.fused_linear_kl return NaN on the given (0-based) calls."""
    real, n = caopd.fused_linear_kl, [0]
    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        n[0] += 1
        return out * float("nan") if n[0] - 1 in calls else out
    monkeypatch.setattr(caopd, "fused_linear_kl", flaky)

def test_a_model_that_states_no_confidence_is_flagged(tmp_path, monkeypatch, capsys):
    import train_small
    monkeypatch.setattr(caopd, "parse_confidence", lambda text, clip=True: None)  # no answer states one
    train_small.main(["--smoke=True", "--method=opd", "--steps=1", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    for name in ("base", "opd"):
        assert models[name]["format_rate"] == 0 and models[name]["format_ok"] is False
        assert f"warning: {name}: only 0% of its answers state a confidence (format rate < 0.5): its ECE and the " \
               "other calibration metrics are not meaningful" in out

def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    import importlib
    import train_small
    ts = importlib.reload(train_small)  # fresh settings
    _nan_on({1}, monkeypatch)
    ts.main(["--smoke=True", "--method=opd", "--steps=3", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "warning: opd step 1: non-finite loss, update skipped (1 in a row, 1 in this stage)" in out
    assert json.loads((tmp_path / "results.json").read_text())["skipped_updates"] == {"opd": 1}

def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    import importlib
    import train_small
    ts = importlib.reload(train_small)
    _nan_on(set(range(100)), monkeypatch)
    with pytest.raises(SystemExit) as e:
        ts.main(["--smoke=True", "--method=opd", "--steps=10", "--max_bad_steps=3", f"--out_dir={tmp_path}"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "opd step 2: 3 non-finite steps in a row (--max_bad_steps=3)" in err and "ckpt.pt" in err
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the last good checkpoint (step 2)
    assert ck["stage"] == "opd" and ck["step"] == 2 and ck["bad_steps"] == 2
    assert not (tmp_path / "results.json").exists()

# -----------------------------------------------------------------------------
# the training log: curves.png from any metrics.jsonl, and wandb's offline files

def test_curves_from_metrics_files_side_by_side(reference_run, tmp_path):
    m = reference_run / "metrics.jsonl"
    r = subprocess.run([sys.executable, os.path.join(HERE, "curves.py"), str(m), str(m), f"--out={tmp_path / 'c.png'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (reference_run / "curves.png").exists()

@pytest.mark.parametrize("text, words", [
    (None, ": no such file"), ('{"kind": "train"', ":2: not a JSON line"), ("[1, 2]", ":2: not a metrics.jsonl record"),
    ('{"kind": "train", "stage": "opd", "step": 3}', ":2: a train record without stated_confidence"),
    ('{"kind": "eval", "stage": "opd", "step": 3}', ":2: a eval record without ece"),
])
def test_curves_bad_input_names_the_file_and_line(reference_run, tmp_path, text, words):
    path = tmp_path / "metrics.jsonl"
    if text is not None:
        path.write_text((reference_run / "metrics.jsonl").read_text().splitlines()[0] + "\n" + text + "\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "curves.py"), str(path), f"--out={tmp_path / 'c.png'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and f"{path}{words}" in r.stderr, r.stderr
    assert not (tmp_path / "c.png").exists()

def test_wandb_not_installed_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    code, out, err = _main(capsys, "--smoke=True", "--wandb_project=test", f"--out_dir={tmp_path / 'out'}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--wandb_project='test': the wandb package is not installed (pip install wandb)" in err
    assert not (tmp_path / "out").exists()

def _wandb_env(tmp_path, mode="offline"):
    """wandb without a network, its settings and caches under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_MODE": mode, "WANDB_SILENT": "true", "NETRC": str(tmp_path / "no-netrc"),
            **{f"WANDB_{d}_DIR": str(tmp_path / d.lower()) for d in ("CONFIG", "CACHE", "DATA")}}

def _wandb_records(path):
    """The records of a run's .wandb file, parsed with wandb's own schema (wandb_internal_pb2.Record).
    The file is a LevelDB-style log, which wandb >= 0.2x reads in Go only: a 7-byte header, then
    32 KiB blocks of chunks, each a 7-byte header (CRC, length, type: 1 whole, 2 first, 3 middle,
    4 last) and its bytes; fewer than 7 bytes left in a block are padding."""
    from wandb.proto import wandb_internal_pb2
    data, pos, part, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records

def _wandb_history(out):
    """{step: {key: value}} of the one offline run under out/wandb, and its config."""
    run, = (out / "wandb").glob("offline-run-*")
    history, config = {}, {}
    for rec in _wandb_records(next(run.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            items = [("/".join(i.nested_key) or i.key, i.value_json) for i in rec.history.item]
            history[rec.history.step.num] = {k: json.loads(v) for k, v in items if not k.startswith("_")}
        elif rec.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    return history, config, run

def _tracked(record):
    """A metrics.jsonl line as the history row metrics_log.metrics_log sends."""
    return {f"{record['kind']}/{record['stage']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}

def test_wandb_offline_run_holds_the_records_settings_and_plots(reference_run, tmp_path):
    pytest.importorskip("wandb")  # not in requirements.txt; .ci/run installs it for this test
    out = tmp_path / "out"
    out.mkdir()
    for f in reference_run.glob("base-*.pt"):  # RUN's base is --smoke's
        (out / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), "--smoke=True", "--wandb_project=test",
                        f"--out_dir={out}"], capture_output=True, text=True, timeout=600, env=_wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _metrics(out, timed=True, file_order=True)  # the tracker's rows: the file's lines, in order
    history, config, run = _wandb_history(out)
    assert len(lines) == 7 and {i: _tracked(x) for i, x in enumerate(lines)} == \
        {i: row for i, row in history.items() if i < len(lines)}  # row i is line i, every value equal
    settings = json.loads((out / "results.json").read_text())["config"]
    assert {k: config[k] for k in settings} == settings and settings["wandb_project"] == "test"  # its config
    images = history[len(lines)]
    assert {images["reliability/_type"], images["curves/_type"]} == {"image-file"}
    assert (run / "files" / images["curves/path"]).read_bytes() == (out / "curves.png").read_bytes()

def test_wandb_failing_to_start_is_one_line_before_anything_trains(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "out"  # online without an API key: it stops before any network
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), "--smoke=True", "--wandb_project=test",
                        f"--out_dir={out}"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                       env=_wandb_env(tmp_path, mode="online"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "--wandb_project='test': wandb failed to start: No API key configured" in r.stderr
    assert "base step" not in r.stdout and not any(out.glob("base-*.pt")) and not (out / "metrics.jsonl").exists()

FAILING_WANDB = """
import sys
import wandb.sdk.wandb_run as wandb_run
real, calls = wandb_run.Run.log, []
def log(run, *args, **kwargs):  # the third call fails, as a full disk or a dropped connection would
    calls.append(1)
    if len(calls) == 3:
        raise OSError(28, "No space left on device")
    return real(run, *args, **kwargs)
wandb_run.Run.log = log
sys.argv[0] = "train_small.py"
import train_small
train_small.main(sys.argv[1:])
"""

def test_wandb_failing_in_the_middle_warns_once_and_the_run_goes_on(reference_run, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "out"
    out.mkdir()
    for f in reference_run.glob("base-*.pt"):
        (out / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-c", FAILING_WANDB, "--smoke=True", "--wandb_project=test",
                        f"--out_dir={out}"], capture_output=True, text=True, timeout=600, cwd=HERE,
                       env=_wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [l for l in r.stdout.splitlines() if l.startswith("warning: wandb failed")]
    assert warnings == [f"warning: wandb failed (OSError: [Errno 28] No space left on device); the run goes on "
                        f"without it, {out}/metrics.jsonl has every line"]
    lines = _metrics(out, timed=True, file_order=True)
    assert len(lines) == 7 and (out / "results.json").exists() and (out / "curves.png").exists()
    history = _wandb_history(out)[0]
    assert history == {i: _tracked(x) for i, x in enumerate(lines[:2])}  # the two rows before it failed

# -----------------------------------------------------------------------------
# real models: a tiny Qwen-style model and a BPE tokenizer with a chat template, built here
# (no download), through train_small.py and back out as a Hugging Face model

CHATML = bench.CHATML

def _tiny_hf(path, chat_template=CHATML):
    """A Qwen3-style model of ~100k parameters and a BPE tokenizer trained on the fixtures, saved in path."""
    from transformers import Qwen3Config
    return bench.make_hf(path, Qwen3Config(vocab_size=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=2048, tie_word_embeddings=True),
                         chat_template=chat_template)

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen")
    assert 50_000 < _tiny_hf(path) < 1_000_000
    return path

HF_RUN = ("--smoke=True", "--steps=2", "--ckpt_every=1", "--max_new_tokens=16", "--n_eval=6", "--K=2")

def test_hf_model_science_both_methods_and_export(tiny_hf, tmp_path):
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    r = _run(f"--init_from={tiny_hf}", "--task=science", f"--data={fixture}", f"--eval_data={fixture}", *HF_RUN,
             f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no chat template" not in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["models"]) == {"base", "opd", "caopd"} and res["models"]["base"]["n"] == 6
    assert "base" not in res["seconds"] or res["seconds"]["base"] < 5  # a pretrained model is the base
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for folder in ("hf", "hf-opd"):
        assert (tmp_path / folder / "model.safetensors").exists()
        model, tok = AutoModelForCausalLM.from_pretrained(tmp_path / folder), AutoTokenizer.from_pretrained(tmp_path / folder)
        ids = tok.apply_chat_template([{"role": "user", "content": "Which element is Na?"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 5 or out[0, -1] == tok.eos_token_id
    caopd_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = torch.load(tmp_path / "caopd.pt", weights_only=True)["model"]
    torch.testing.assert_close(caopd_model.state_dict()["model.norm.weight"], trained["model.norm.weight"])
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 18 and all(isinstance(c["answer"], str) for c in completions)

def test_hf_model_plain_text_tooluse_and_arith(tmp_path):
    path = tmp_path / "plain"
    _tiny_hf(path, chat_template=None)
    fixture = os.path.join(HERE, "data", "tooluse", "fixture.jsonl")
    r = _run(f"--init_from={path}", "--task=tooluse", f"--data={fixture}", f"--eval_data={fixture}", *HF_RUN,
             "--method=caopd", "--max_new_tokens=72", "--n_eval=15", f"--out_dir={tmp_path / 'tool'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("no chat template, prompts are plain text") == 1
    # tool use is scored both ways: the first call (the top level, training's P_acc) and every golden call
    assert "every golden call checked (the authors' eval_tooluse.py)" in r.stdout
    res = json.loads((tmp_path / "tool" / "results.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "tool" / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 30 and sum(len(r["answer"]["calls"]) > 1 for r in records) == 6  # 3 rows x 2 models
    for name in ("base", "caopd"):
        m, mine = res["models"][name], [r for r in records if r["model"] == name]
        assert [r["correct"] for r in mine] == [tasks.verify_tooluse(r["answer"], r["completion"]) for r in mine]
        assert [r["correct_all_calls"] for r in mine] == [tasks.verify_tooluse_all_calls(r["answer"], r["completion"])
                                                          for r in mine]
        conf = [r["confidence"] or 0.0 for r in mine]
        assert m["all_calls"] == caopd.calibration_metrics([r["correct_all_calls"] for r in mine], conf)
        assert m["accuracy"] == caopd.calibration_metrics([r["correct"] for r in mine], conf)["accuracy"]
        assert m["all_calls"]["n"] == 15 and m["all_calls"]["mean_confidence"] == m["mean_confidence"]
    r = _run(f"--init_from={path}", "--task=arith", *HF_RUN, "--method=opd", f"--out_dir={tmp_path / 'arith'}")
    assert r.returncode == 0, r.stderr[-3000:]
    arith_res = json.loads((tmp_path / "arith" / "results.json").read_text())["models"]["opd"]
    assert arith_res["n"] == 6 and "all_calls" not in arith_res

# Qwen3's way: the generation prompt closes an empty think block when enable_thinking is false. This
# one also opens one when it is true, so that each of the three values renders differently
THINKING = CHATML.replace("<|im_start|>assistant\n{% endif %}",
                          "<|im_start|>assistant\n{% if enable_thinking is defined %}{% if enable_thinking is false %}"
                          "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}{% endif %}")

def test_enable_thinking_reaches_the_template_for_student_and_teacher(tmp_path):
    from transformers import AutoTokenizer
    _tiny_hf(tmp_path / "thinking", chat_template=THINKING)
    _tiny_hf(tmp_path / "chatml")
    tok, plain = AutoTokenizer.from_pretrained(tmp_path / "thinking"), AutoTokenizer.from_pretrained(tmp_path / "chatml")
    assert tokenizer.template_reads(tok, "enable_thinking") and not tokenizer.template_reads(plain, "enable_thinking")
    assert not tokenizer.template_reads(ENC, "enable_thinking")  # the toy has no template
    ex = {"messages": [{"role": "user", "content": "Which element is Na?"}]}
    tail = {"default": "<|im_start|>assistant\n", "false": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            "true": "<|im_start|>assistant\n<think>\n"}
    for value, end in tail.items():
        student = tok.decode(tokenizer.student_tokens(tok, ex, value))
        teacher = tok.decode(tokenizer.teacher_tokens(tok, ex, dict(template="demo", solution="Sodium.\nConfidence: 0.9",
                                                                   confidence=0.5, note=0.5), value))
        assert student == "<|im_start|>user\nWhich element is Na?<|im_end|>\n" + end
        assert teacher.startswith("<|im_start|>user\nWhich element is Na?\nThis is an example") and teacher.endswith(
            "Now answer with a response of your own.\n<|im_end|>\n" + end)
        # a template that never reads it renders the same whatever the value
        assert plain.decode(tokenizer.student_tokens(plain, ex, value)) == student.replace(end, tail["default"])

def test_enable_thinking_in_a_run_and_ignored_once_where_unused(tmp_path, monkeypatch, capsys):
    import train_small
    _tiny_hf(tmp_path / "thinking", chat_template=THINKING)
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    seen = []  # every prompt of the run: rollouts, student and teacher forward passes, evaluation
    sample, hidden = caopd.sample, hf.completion_hidden
    monkeypatch.setattr(caopd, "sample", lambda model, prompts, *a, **k: seen.extend(prompts) or sample(model, prompts, *a, **k))
    monkeypatch.setattr(hf, "completion_hidden", lambda model, prompts, c: seen.extend(prompts) or hidden(model, prompts, c))
    train_small.main([f"--init_from={tmp_path / 'thinking'}", "--task=science", f"--data={fixture}", f"--eval_data={fixture}",
                      *HF_RUN, "--steps=1", "--n_eval=2", "--method=caopd", "--teacher_context=correct_solution",
                      "--enable_thinking=false", f"--out_dir={tmp_path / 'out'}"])
    assert "ignored" not in capsys.readouterr().out
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "thinking")
    texts = [tok.decode(p) for p in seen]
    assert len(texts) == 4 * 2 * 3 + 2 * 2  # one step of 4 prompts x K = 2: rollouts, student, teacher; then
                                            # 2 held-out questions x 2 models
    assert all(t.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for t in texts)
    assert sum("Correct solution:" in t for t in texts) == 8  # the teacher's prompts too
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["enable_thinking"] == "false"
    # a template that never reads it: said once, and the run goes on
    _tiny_hf(tmp_path / "chatml")
    r = _run(f"--init_from={tmp_path / 'chatml'}", "--task=science", f"--data={fixture}", f"--eval_data={fixture}",
             *HF_RUN, "--steps=1", "--n_eval=2", "--method=opd", "--enable_thinking=true", f"--out_dir={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("--enable_thinking='true' ignored: its chat template never reads it\n") == 1

def test_hf_sampler_matches_a_full_forward_with_left_padding(tiny_hf):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # two lengths: the second is left-padded
    out = caopd.sample(model, prompts, 6, end_id=2, temperature=0, decoder=hf.decoder)
    for p, o in zip(prompts, out):
        seq = list(p)
        for t in o:  # greedy, one token at a time, no cache, no padding
            assert model(torch.tensor([seq])).logits[0, -1].argmax().item() == t
            seq.append(t)

@pytest.mark.parametrize("args,words", [
    (("--init_from=/no/such/model",), "is neither 'scratch', 'resume' nor a loadable"),
    (("--task=tooluse",), "data/tooluse/train.jsonl: no such file (python data/tooluse/prepare.py writes it)"),
    (("--task=science", "--data=/no/such.jsonl"), "/no/such.jsonl: no such file"),
])
def test_hf_bad_input(tiny_hf, tmp_path, args, words):
    if "--init_from" not in args[0]:
        args = (f"--init_from={tiny_hf}",) + args
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *args, f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]

def test_hf_question_longer_than_the_context_is_skipped_and_counted(tiny_hf, tmp_path):
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    rows = [json.loads(line) for line in open(fixture)]
    long = json.loads(json.dumps(rows[0]))
    long["id"], long["messages"][1]["content"] = "too-long", long["messages"][1]["content"] * 40  # > 2048 tokens
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + [long] + rows[3:]))
    r = _run(f"--init_from={tiny_hf}", "--task=science", f"--data={data}", f"--eval_data={fixture}", *HF_RUN,
             "--method=opd", "--steps=1", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{data}: skipped 1 of 13 questions longer than the context (2048 tokens, with max_new_tokens=16); " \
           "the first: too-long" in r.stdout

# -----------------------------------------------------------------------------
# a real model on one GPU: float32 master weights, micro-batches, checkpointing, the prompt cache

@pytest.fixture
def exact_rmsnorm(monkeypatch):
    """Qwen3's RMSNorm computes in float32 even in a float64 model; sums taken in another order then
    differ by up to ~1e-3 of a gradient element. In the model's own dtype every equality below holds to 1e-10."""
    from transformers.models.qwen3 import modeling_qwen3
    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", lambda self, h: self.weight * (
        h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)))

def _hf_double(seed=0):
    from transformers import AutoModelForCausalLM, Qwen3Config
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).double().eval()

# prompts of several lengths, questions with K = 3 rollouts each, completions of uneven lengths
PROMPTS = [[5, 6, 7, 8, 9]] * 3 + [[11, 12, 13]] * 3 + [[14, 15, 16, 17]] * 3
COMPLETIONS = [[20, 21, 22, 1], [23, 1], [24, 25, 26, 27, 28], [29, 1], [30, 31, 32], [33], [40, 41], [42, 43, 44], [1]]

def _rows_one_by_one(model):
    """The reference: each row's whole sequence alone (no padding, no cache), its completion's states."""
    return [model.base_model(input_ids=torch.tensor([p + c[:-1]])).last_hidden_state[0, len(p) - 1:]
            for p, c in zip(PROMPTS, COMPLETIONS)]

def _grads(model, states):
    model.zero_grad()
    sum((h ** 2).sum() for h in states).backward()
    return [p.grad.clone() for p in model.parameters()]

def test_hf_prompt_cache_gives_the_states_of_whole_sequences(exact_rmsnorm):
    model = _hf_double()
    ref = _rows_one_by_one(model)
    g_ref = _grads(model, ref)
    h, lens = hf.completion_hidden(model, PROMPTS, COMPLETIONS)  # each distinct prompt once, into a cache
    ours = [h[i, :n] for i, n in enumerate(lens)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(_grads(model, ours), g_ref):  # and the gradients
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

def _kl_grads(cfg, model, teacher, prompts, completions, teacher_prompts):
    import train_small
    model.zero_grad()
    loss = train_small.kl_backward(cfg, caopd.Distiller(model, teacher, **models.seams(model)), prompts, completions,
                                   teacher_prompts)
    return loss.item(), [p.grad.clone() for p in model.parameters()]

@pytest.mark.parametrize("hf", [False, True])
def test_micro_batches_give_the_loss_and_gradient_of_the_whole_step(hf, exact_rmsnorm):
    import train_small
    if hf:
        model, teacher = _hf_double(0), _hf_double(1)
        prompts, completions = PROMPTS, COMPLETIONS
    else:
        model, teacher = _tiny_model(0).double(), _tiny_model(1).double()
        prompts, completions = [p[:3] for p in PROMPTS], COMPLETIONS  # our GPT's prompts: one length
    teacher_prompts = [p + [50 + i // 3] for i, p in enumerate(prompts)]  # the teacher's own, longer prompts
    whole = _kl_grads(train_small.settings(micro_batch=0), model, teacher, prompts, completions, teacher_prompts)
    for mb in (1, 3, 4, len(prompts)):  # 4 cuts the rollouts of a question apart
        part = _kl_grads(train_small.settings(micro_batch=mb), model, teacher, prompts, completions, teacher_prompts)
        assert part[0] == pytest.approx(whole[0], rel=0, abs=1e-10)
        for a, b in zip(part[1], whole[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # and skip_tokens counts the same way: a completion with nothing left in the loss counts as no sequence
    skip = _kl_grads(train_small.settings(micro_batch=2, skip_tokens=2), model, teacher, prompts, completions,
                     teacher_prompts)
    whole = _kl_grads(train_small.settings(skip_tokens=2), model, teacher, prompts, completions, teacher_prompts)
    assert skip[0] == pytest.approx(whole[0], rel=0, abs=1e-10)

@pytest.mark.parametrize("loss", ["reverse", "forward", "jsd"])
def test_the_plain_autograd_loss_setting_gives_the_fused_loss_and_gradients(loss):
    """--fused=False: the same step through linear_kl_reference (where a new divergence needs only
    its formula in kl_divergence)."""
    import train_small
    model, teacher = _tiny_model(0).double(), _tiny_model(1).double()
    prompts = [p[:3] for p in PROMPTS]
    args = (model, teacher, prompts, COMPLETIONS, [p + [50] for p in prompts])
    fused = _kl_grads(train_small.settings(loss=loss, jsd_beta=0.3), *args)
    plain = _kl_grads(train_small.settings(loss=loss, jsd_beta=0.3, fused=False, micro_batch=2), *args)
    assert plain[0] == pytest.approx(fused[0], rel=1e-12) and fused[0] > 1e-3
    for a, b in zip(plain[1], fused[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

def test_a_divergence_without_a_fused_kernel_asks_for_the_plain_loss(monkeypatch, capsys):
    monkeypatch.setattr(caopd, "DIVERGENCES", caopd.DIVERGENCES + ("symmetric",))
    code, _, err = _main(capsys, "--loss=symmetric")
    assert code == 2 and "--loss='symmetric': has no fused kernel" in err and "--fused=False" in err
    code, _, err = _main(capsys, "--loss=hellinger")
    assert code == 2 and "--loss='hellinger': must be one of" in err

def test_a_new_template_changes_no_token_of_the_toy_nor_its_base(monkeypatch, tmp_path, capsys):
    import train_small
    cfg = train_small.settings(smoke=True, out_dir=str(tmp_path), device="cpu")
    base, tok, context, _ = models.load_model(cfg)
    held, sample_train, _ = questions.load_task(cfg, tok, None, context)
    path = toy_base.cached_base(cfg, base, tok, sample_train, str(tmp_path))
    before = caopd.toy_tokenizer(arith.VOCAB_TEXT)
    monkeypatch.setitem(caopd.TEMPLATES, "mine", "{question}\nAn entirely new context word:\n{solution}\n{note}Go.\n")
    after = caopd.toy_tokenizer(arith.VOCAB_TEXT)
    assert after.n_vocab == before.n_vocab and after.encode(EX["question"]) == before.encode(EX["question"])
    capsys.readouterr()
    assert toy_base.cached_base(cfg, base, tok, sample_train, str(tmp_path)) == path  # the same file, reused
    assert "reusing base model" in capsys.readouterr().out
    prompt = caopd.teacher_prompt(EX["question"], 1, "mine", EX["reference"], 0.5, None)
    assert after.decode(after.encode(prompt)) == prompt  # its new words are spelled in bytes

@pytest.mark.parametrize("hf", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(hf, exact_rmsnorm):
    import train_small
    model, teacher = (_hf_double(0), _hf_double(1)) if hf else (_tiny_model(0).double(), _tiny_model(1).double())
    prompts = PROMPTS if hf else [p[:3] for p in PROMPTS]
    args = (model, teacher, prompts, COMPLETIONS, [p + [60] for p in prompts])
    plain = _kl_grads(train_small.settings(), *args)
    models.set_grad_checkpoint(model, True)
    checked = _kl_grads(train_small.settings(grad_checkpoint=True, micro_batch=4), *args)
    models.set_grad_checkpoint(model, False)
    assert checked[0] == pytest.approx(plain[0], rel=1e-12)
    for a, b in zip(checked[1], plain[1]):  # HF under checkpointing runs whole sequences, not the prompt cache
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

def test_rollouts_in_several_calls_are_the_same_rollouts():
    import train_small
    model, tok = _tiny_model().double(), ENC
    held, sample_train = arith.split(0, 10)
    exs = held[:5]
    verify = lambda ex, text: caopd.verify_arith(ex["answer"], text)
    runs = [rollout_batch(train_small.settings(rollout_batch=mb, temperature=1.0), caopd.Distiller(model, None),
                                      tok, "caopd", exs,
                                      verify, 7, (0, 40)) for mb in (0, 3, 8)]
    for r in runs[1:]:
        assert r[1] == runs[0][1] and r[3] == runs[0][3]  # completions, texts
    assert len(set(map(tuple, runs[0][1]))) > 10  # and they are varied samples

def _bf16_checkpoint(path):
    _tiny_hf(path)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16)  # as Qwen3's files are
    model.save_pretrained(path)
    return {k: v.float() for k, v in model.state_dict().items()}

def test_bfloat16_compute_keeps_float32_master_weights_that_move(tmp_path):
    """At lr 1e-6 an AdamW update is below half a bfloat16 ulp of most weights: bfloat16 weights would
    not move. The student's weights are float32 whatever the compute: 2 steps change most of them."""
    start = _bf16_checkpoint(tmp_path / "bf16")
    r = _run(f"--init_from={tmp_path / 'bf16'}", "--task=arith", "--dtype=bfloat16", "--lr=1e-6", "--steps=2",
             "--method=opd", "--smoke=True", "--n_eval=4", "--K=2", "--max_new_tokens=16", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bfloat16 compute" in r.stdout
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    moved = total = 0
    for k, v in ck["model"].items():
        assert v.dtype == torch.float32, k
        moved, total = moved + (v != start[k]).sum().item(), total + v.numel()
        # the same change rounded to bfloat16 would be mostly lost: that is what float32 master weights keep
    assert moved / total > 0.8, moved / total
    lost = sum((v.bfloat16().float() == start[k]).sum().item() for k, v in ck["model"].items()) / total
    assert lost > 0.8, lost  # in bfloat16 these weights would not have moved
    assert ck["teacher"]["model.norm.weight"].dtype == torch.bfloat16  # a frozen teacher: compute dtype
    from safetensors.torch import load_file
    exported = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}  # exported as the files were
    assert json.loads((tmp_path / "out" / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["config"]["dtype"] == "bfloat16" and res["config"]["export_dtype"] == "bfloat16"

def test_fused_loss_under_bfloat16_autocast_matches_plain_autograd():
    hs, ws, ht, wt = (t.float().detach().requires_grad_(i < 2) for i, t in enumerate(_case(N=37, d_s=16, d_t=16, V=300)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = caopd.fused_linear_kl(hs, ws, ht, wt)
        g = torch.autograd.grad(fused, (hs, ws))
    exact = caopd.linear_kl_reference(hs.double(), ws.double(), ht.double(), wt.double())
    g_exact = torch.autograd.grad(exact, (hs, ws))
    assert fused.dtype == torch.float32 and g[0].dtype == g[1].dtype == torch.float32
    assert fused.item() == pytest.approx(exact.item(), rel=2e-2)  # bfloat16 products: ~3 significant digits
    for a, b in zip(g, g_exact):
        assert (a.double() - b).norm() / b.norm() < 3e-2

def test_bad_real_model_settings(tmp_path, capsys, monkeypatch):
    for arg, words in (("--micro_batch=-1", "--micro_batch=-1: must be >= 0"), ("--rollout_batch=-2", "--rollout_batch=-2"),
                       ("--dtype=float16", "--dtype='float16': must be 'auto', 'float32' or 'bfloat16'"),
                       ("--export_dtype=int8", "--export_dtype='int8'")):
        code, _, err = _main(capsys, arg, f"--out_dir={tmp_path / 'out'}")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(SystemExit) as e:
        cli.resolve_dtype("bfloat16", "cuda")
    assert e.value.code == 2 and "--dtype='bfloat16': this GPU (Tesla T4) has no bfloat16" in capsys.readouterr().err
    assert cli.resolve_dtype("auto", "cuda") == "float32" and cli.resolve_dtype("auto", "cpu") == "float32"
    _tiny_hf(tmp_path / "m")
    from transformers.models.qwen3 import modeling_qwen3
    monkeypatch.setattr(modeling_qwen3.Qwen3PreTrainedModel, "supports_gradient_checkpointing", False)
    code, _, err = _main(capsys, f"--init_from={tmp_path / 'm'}", "--grad_checkpoint=True", f"--out_dir={tmp_path / 'o'}")
    assert code == 2 and "--grad_checkpoint=True: Qwen3ForCausalLM" in err and "does not support" in err
    assert not (tmp_path / "o").exists()

def test_gpu_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """python bench.py --gpu is for a machine with a GPU; --tiny runs the same code on a small model here."""
    result = bench.bench_gpu(tiny=True, out=str(tmp_path / "gpu.json"))
    assert set(result["rollouts"]) == set(result["eval"]) == {"eager", "captured"}
    assert len(result["steps"]) == 4
    assert all(r["tok_s"] > 0 for r in [*result["rollouts"].values(), *result["eval"].values()])
    assert len(result["compile_s"]) == 1 and result["rollouts"]["captured"]["rows_alike"] == 1.0
    assert all(r["step_s"] > 0 and 0 < r["rollout_share"] < 1 for r in result["steps"])
    assert result["loss"]["ms"] > 0 and result["loss"]["chunk"] == 64 and not result["skipped"]
    assert result["gpt_captured"]["same_greedy_tokens"]
    assert result["loss_precision"]["float32_out"] == "emulated"  # this CPU has no float32-out product
    assert json.loads((tmp_path / "gpu.json").read_text())["gpu"] == json.loads(json.dumps(result))
    out = capsys.readouterr().out  # each figure printed as it is measured
    assert out.count(" decode step: {") == 4 and out.count("  step, ") == 4 and "fused loss's error" in out

# -----------------------------------------------------------------------------
# several processes: torchrun with gloo on CPU

def test_torchrun_two_processes_match_one(tmp_path):
    args = ("--smoke=True", "--method=caopd", "--steps=2", "--n_eval=8", "--prompts_per_step=4")
    r = _run(*args, f"--out_dir={tmp_path / 'one'}")
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "two").mkdir()
    for f in (tmp_path / "one").glob("base-*.pt"):  # the same base (rank 0 would train the same one)
        (tmp_path / "two" / f.name).write_bytes(f.read_bytes())
    r = _torchrun(os.path.join(HERE, "train_small.py"), *args, f"--out_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    one = torch.load(tmp_path / "one" / "caopd.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "caopd.pt", weights_only=True)["model"]
    base = torch.load(next((tmp_path / "one").glob("base-*.pt")), weights_only=True)["model"]
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4  # training moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert res[1]["models"]["caopd"]["n"] == 8  # both processes answered, rank 0 gathered
    assert [json.loads(line)["id"] for line in open(tmp_path / "two" / "completions.jsonl")] == \
           [json.loads(line)["id"] for line in open(tmp_path / "one" / "completions.jsonl")]

def _torchrun(*args, n=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

# (fsdp, micro_batch, grad_checkpoint, ema_rate): DDP and FSDP2, with micro-batches, checkpointing, an EMA teacher
PARALLEL_CASES = [(False, 2, False, 0.0), (False, 0, True, 0.5), (True, 2, False, 0.5), (True, 4, True, 0.0)]

def parallel_worker(model_dir, out, cases):
    """Under torchrun (or alone, as the reference): for each case, a float64 tiny Qwen3 through
    train_small's own functions: one CaOPD step's rollouts and gradients, then 3 steps of distill
    and the weights after them, and the held-out answers. Rank 0 saves them to out/<case>.pt."""
    import random
    import parallel
    import train_small
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    device = parallel.init("cpu")
    for case in json.loads(cases):
        fsdp, micro_batch, grad_checkpoint, ema_rate = case
        cfg = train_small.settings(init_from=model_dir, task="science", data=fixture, eval_data=fixture, K=2,
                                   prompts_per_step=4, steps=3, max_new_tokens=10, temperature=1.0, lr=1e-3, n_eval=6,
                                   micro_batch=micro_batch, grad_checkpoint=grad_checkpoint, ema_rate=ema_rate,
                                   fsdp=fsdp and parallel.WORLD > 1,
                                   out_dir=out, ckpt_every=100, device=device, dtype="float32", export_dtype="float32")
        files = questions.read_task_files(cfg)
        model, tok, context, _ = models.load_model(cfg, torch.float64)
        held, sample_train, verify = questions.load_task(cfg, tok, files, context)
        net = train_small.distiller(cfg, model)
        n = cfg.prompts_per_step // parallel.WORLD
        exs = sample_train(random.Random(5), cfg.prompts_per_step)[parallel.RANK * n:parallel.RANK * n + n]
        models.set_grad_checkpoint(model, cfg.grad_checkpoint)
        prompts, completions, teacher_prompts, texts, *_ = rollout_batch(
            cfg, net, tok, "caopd", exs, verify, 0, (parallel.RANK * n * cfg.K, cfg.prompts_per_step * cfg.K))
        train_small.kl_backward(cfg, net, prompts, completions, teacher_prompts)
        grads = {k: parallel.local_norm(p.grad).clone() for k, p in model.named_parameters()}  # whole (gathered)
        model.zero_grad(set_to_none=True)
        rollouts = parallel.gather(texts)
        train_small.distill(cfg, net, tok, "caopd", sample_train, verify)
        teacher = parallel.full_state(parallel.inner(net).teacher)
        state = {**parallel.full_state(model), **{f"teacher.{k}": v for k, v in teacher.items()}}
        _, records = train_small.evaluate(cfg, net, tok, "caopd", held, verify)
        if parallel.RANK == 0:
            torch.save({"grads": grads, "rollouts": rollouts, "state": state, "answers": [r["completion"] for r in records]},
                       os.path.join(out, f"{'-'.join(map(str, case))}.pt"))
    parallel.close()

@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, tiny_hf):
    """One process, then two under torchrun (gloo), on the same cases."""
    out = tmp_path_factory.mktemp("parallel")
    cases = json.dumps(PARALLEL_CASES)
    for d, n in (("one", 1), ("two", 2)):
        (out / d).mkdir()
        r = _torchrun(os.path.abspath(__file__), "parallel_worker", str(tiny_hf), str(out / d), cases, n=n)
        assert r.returncode == 0, r.stderr[-4000:]
    return out

@pytest.mark.parametrize("case", PARALLEL_CASES, ids=lambda c: f"{'fsdp' if c[0] else 'ddp'}-mb{c[1]}-ckpt{c[2]}-ema{c[3]}")
def test_ddp_and_fsdp2_match_one_process(parallel_runs, case):
    name = f"{'-'.join(map(str, case))}.pt"
    one, two = (torch.load(parallel_runs / d / name, weights_only=True) for d in ("one", "two"))
    assert two["rollouts"] == one["rollouts"] and len(one["rollouts"]) == 8  # 4 questions x K = 2, in order
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-3
    assert set(two["grads"]) == set(one["grads"])
    for k in one["grads"]:
        torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=0, atol=1e-12)
    for k in one["state"]:  # student and teacher
        torch.testing.assert_close(two["state"][k], one["state"][k], rtol=0, atol=1e-12)
    assert two["answers"] == one["answers"] and len(one["answers"]) == 6

def test_ddp_and_fsdp2_keep_a_tied_output_layer_tied(parallel_runs):
    for case in PARALLEL_CASES:  # an untied copy would be a 26th entry, trained apart from the embedding
        two = torch.load(parallel_runs / "two" / f"{'-'.join(map(str, case))}.pt", weights_only=True)
        assert "lm_head.weight" not in two["grads"] and len(two["grads"]) == 24

def _fsdp_run(tiny_hf, *extra):
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    return (os.path.join(HERE, "train_small.py"), f"--init_from={tiny_hf}", "--task=science", f"--data={fixture}",
            f"--eval_data={fixture}", "--fsdp=True", "--smoke=True", "--K=2", "--steps=6",
            "--ckpt_every=2", "--max_new_tokens=16", "--n_eval=6", "--export_dtype=float32", *extra)

def test_fsdp2_resume_after_sigkill_gives_the_uninterrupted_results_and_a_whole_export(tiny_hf, tmp_path):
    r = _torchrun(*_fsdp_run(tiny_hf, f"--out_dir={tmp_path / 'ref'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_fsdp_run(tiny_hf, f"--out_dir={out}")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if "checkpoint: caopd step 4" in line:  # in the second method; SIGKILL to torchrun and both processes (each in its own session)
            for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
                try:
                    if str(out).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                        os.kill(pid, 9)
                except OSError:  # gone meanwhile
                    pass
            break
    p.wait(timeout=60)
    assert not (out / "results.json").exists() and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    r = _torchrun(*_fsdp_run(tiny_hf, f"--out_dir={out}", "--init_from=resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming caopd at step 4" in r.stdout
    assert _without_seconds(out)["models"] == _without_seconds(tmp_path / "ref")["models"]
    assert (out / "completions.jsonl").read_bytes() == (tmp_path / "ref" / "completions.jsonl").read_bytes()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")  # the whole model, from the gathered shards
    saved = torch.load(out / "caopd.pt", weights_only=True)["model"]
    assert {k for k in saved if k != "lm_head.weight"} <= set(hf.state_dict())
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    # one process without FSDP2 trains the same models (float32: to rounding)
    r = _run(*_fsdp_run(tiny_hf, f"--out_dir={tmp_path / 'one'}", "--fsdp=False")[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    models = {(d.name, m): torch.load(d / f"{m}.pt", weights_only=True)["model"]
              for d in (tmp_path / "one", out) for m in ("opd", "caopd")}
    for (d, m), state in models.items():
        for k in state:
            torch.testing.assert_close(state[k], models["one", m][k], rtol=0, atol=1e-5)
    opd, caopd_ = models["out", "opd"], models["out", "caopd"]  # each method from the base, apart
    assert max((opd[k] - caopd_[k]).abs().max().item() for k in opd) > 1e-4
    # a resume without torchrun is refused, naming the setting
    r = _run(*_fsdp_run(tiny_hf, f"--out_dir={out}", "--init_from=resume")[1:])
    assert r.returncode == 2 and "--fsdp=True: shards a model across processes" in r.stderr

@pytest.mark.parametrize("args,words", [
    (("--fsdp=True",), "--fsdp=True: shards a model across processes: run under torchrun"),
])
def test_fsdp_without_torchrun_is_one_line(args, words, tmp_path):
    r = _run(*args, f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

def test_fsdp_with_the_toy_gpt_is_one_line(tmp_path):
    r = _torchrun(os.path.join(HERE, "train_small.py"), "--fsdp=True", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode != 0 and "--fsdp=True: shards a Hugging Face model's decoder layers" in r.stderr
    assert not (tmp_path / "o").exists()

# -----------------------------------------------------------------------------
# experiments: the machinery of experiments.py (the science is in its runs, not here)

def test_entropy_on_a_hand_case():
    hidden = torch.tensor([[0.0, 0.0, math.log(2)], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # logits = hidden @ I: p = (1/4, 1/4, 1/2) -> H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2; a uniform row -> ln 3
    h = experiments.entropy(hidden, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([1.5 * math.log(2), math.log(3)], dtype=torch.float64))

def _enumerated(hs, ws, ht, wt, w):
    """Every (position, token) pair as a row, weighted by the position's weight times p_s(token):
    the sampled estimator on these rows IS its expectation over tokens y ~ p_s."""
    N, V = len(hs), len(ws)
    p = torch.softmax(hs @ ws.T, -1).detach()  # (N, V)
    rows, toks = torch.arange(N).repeat_interleave(V), torch.arange(V).repeat(N)
    return hs[rows], ht[rows], w[rows] * p[rows, toks], toks

@pytest.mark.parametrize("baseline", [False, True])
def test_sampled_estimators_are_unbiased_by_exact_enumeration(baseline):
    hs, ws, ht, wt = _case(N=5, d_s=4, d_t=3, V=9, seed=1)
    hs, ws, ht, wt = (t.double() for t in (hs, ws, ht, wt))
    hs.requires_grad_(True), ws.requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    full = caopd.fused_linear_kl(hs, ws, ht, wt, w)
    g_full = torch.autograd.grad(full, (hs, ws))
    h_rows, t_rows, w_rows, toks = _enumerated(hs, ws, ht, wt, w)
    est = experiments.sampled_kl(h_rows, ws, t_rows, wt, w_rows, toks, baseline=baseline)
    g_est = torch.autograd.grad(est, (hs, ws))
    torch.testing.assert_close(est, full, rtol=1e-10, atol=1e-12)  # E[-r] = KL
    for a, b in zip(g_est, g_full):  # E[gradient] = the full-vocabulary gradient
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

def test_one_sampled_token_is_not_the_full_gradient_and_the_baseline_changes_it():
    hs, ws, ht, wt = (t.double().requires_grad_(i < 2) for i, t in enumerate(_case(N=4, d_s=4, d_t=3, V=9, seed=2)))
    w, toks = torch.ones(4, dtype=torch.float64), torch.tensor([0, 3, 5, 8])
    g = [torch.autograd.grad(f(), ws)[0] for f in (
        lambda: caopd.fused_linear_kl(hs, ws, ht, wt, w),
        lambda: experiments.sampled_kl(hs, ws, ht, wt, w, toks),
        lambda: experiments.sampled_kl(hs, ws, ht, wt, w, toks, baseline=True))]
    assert (g[0] - g[1]).abs().max() > 1e-3 and (g[1] - g[2]).abs().max() > 1e-3

def test_topk_with_a_tail_bucket():
    hs, ws, ht, wt = (t.double().requires_grad_(i < 2) for i, t in enumerate(_case(N=6, d_s=4, d_t=3, V=9, seed=3)))
    w = torch.rand(6, dtype=torch.float64)
    full = caopd.fused_linear_kl(hs, ws, ht, wt, w)
    exact = experiments.topk_tail_kl(hs, ws, ht, wt, w, k=8)  # V - 1 tokens + a one-token tail: the full KL
    torch.testing.assert_close(exact, full, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(exact, (hs, ws)), torch.autograd.grad(full, (hs, ws))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for k in (1, 2, 4):  # coarsening never increases a KL: a lower bound
        assert experiments.topk_tail_kl(hs, ws, ht, wt, w, k=k) <= full + 1e-12

def test_smoothed_p_acc():
    assert caopd.empirical_confidence([1, 1, 0, 0], smoothed=True) == 3 / 6
    assert caopd.empirical_confidence([0, 0, 0, 0], smoothed=True) == 1 / 6
    assert caopd.empirical_confidence([1, 1]) == 1.0 and caopd.empirical_confidence([0, 1]) == 0.5

def test_question_generators_keep_the_training_task_and_group_by_length():
    import random
    rng = random.Random(0)
    assert [arith.make_example(rng)["id"] for _ in range(5)] == ["015*075", "048*055", "242+027", "918+078", "022+175"]
    for ops, digits, width in (("-", None, 3), ("+", 4, 4), ("*", 3, 3)):
        held, _ = arith.split(1, 50, ops, digits)
        assert {len(ENC.encode(ex["question"])) for ex in held} == {len(ENC.encode(held[0]["question"]))}
        for ex in held:
            a, b = (int(x) for x in ex["id"].split(ops))
            assert len(ex["id"]) == 2 * width + 1 and ex["answer"] == {"+": a + b, "*": a * b, "-": a - b}[ops] >= 0
            assert caopd.verify_arith(ex["answer"], ex["reference"])

def test_scaling_sweep_bookkeeping_on_two_tiny_sizes(tmp_path):
    args = [sys.executable, os.path.join(HERE, "experiments.py"), "scaling", "--smoke=True", "--sizes=1x16,1x32",
            "--n_eval=8", f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert (tmp_path / "out" / "scaling.png").exists()
    rows = result["rows"]
    assert [(r["size"], r["model"]) for r in rows] == [(s, m) for s in ("1x16", "1x32") for m in ("base", "opd", "caopd")]
    assert all(r["n"] == 8 for r in rows) and rows[0]["params"] != rows[3]["params"]
    assert result["seconds"] > 0 and result["settings"]["experiment"]["sizes"] == "1x16,1x32"
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["base", "base", "caopd", "caopd", "opd", "opd"]
    log = torch.load(next((tmp_path / "cache").glob("opd-*.pt")), weights_only=True)["entropy"]
    assert log[0]["step"] == 0 and {"student_answer", "teacher_confidence", "teacher_no_context_all"} <= set(log[0])
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)  # every model from the cache
    assert again.returncode == 0 and again.stdout.count("reusing") == 6, again.stdout[-2000:]
    assert json.loads((tmp_path / "out" / "scaling.json").read_text())["rows"] == rows

def test_continual_phases_are_scored_on_the_default_held_out_questions_by_kind(tmp_path):
    args = [sys.executable, os.path.join(HERE, "experiments.py"), "continual", "--smoke=True", "--n_eval=16",
            f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "continual.json").read_text())["rows"]
    held = arith.split(0, 16)[0]
    n = {"A: add": sum(e["kind"] == "add" for e in held), "B: mul": sum(e["kind"] == "mul" for e in held)}
    assert 0 < n["B: mul"] < 16 and all(r["n"] == n[r["eval on"]] for r in rows)
    assert [(r["model"], r["after"]) for r in rows[::2]] == [("base", "base"), ("opd", "A"), ("opd", "A then B"),
                                                              ("caopd", "A"), ("caopd", "A then B")]
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["base", "caopd", "caopd", "opd", "opd"]  # each phase's model once

if __name__ == "__main__":  # torchrun test_caopd.py parallel_worker ...: the processes of the tests above
    globals()[sys.argv[1]](*sys.argv[2:])

# -----------------------------------------------------------------------------
# rollouts at the GPU's speed: a call's random numbers at once, the finish read every few tokens,
# a static KV cache, the decode step captured (torch.compile), batches sized to memory

def _sample_token_by_token(model, prompts, new, end_id, temperature, seed):
    """The sampler as it was: the whole sequence again each step, one uniform per row drawn per token."""
    g, seqs, out = torch.Generator().manual_seed(seed), [list(p) for p in prompts], [[] for _ in prompts]
    for _ in range(new):
        logits = model(torch.tensor(seqs))[:, -1] @ model.wte.weight.T
        cdf = F.softmax(logits / temperature, -1).cumsum(-1)
        u = torch.rand(len(prompts), 1, generator=g) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[1] - 1).tolist()
        for s, o, t in zip(seqs, out, nxt):
            if not o or o[-1] != end_id:
                o.append(t)
            s.append(t)
    return out

def test_a_calls_uniforms_drawn_at_once_are_those_drawn_token_by_token():
    model = _tiny_model()
    prompts = [ENC.encode(arith.QUESTION.format(a=a, op="+", b=b) + "\n") for a, b in [(10, 20), (34, 55), (99, 12)] * 2]
    want = _sample_token_by_token(model, prompts, 14, ENC.eot_token, 1.0, seed=3)
    whole = caopd.sample(model, prompts, 14, ENC.eot_token, 1.0, generator=torch.Generator().manual_seed(3))
    u = torch.rand(14, 6, 1, generator=torch.Generator().manual_seed(3))  # the whole batch's, as train_small draws them
    halves = [caopd.sample(model, prompts[a:a + 3], 14, ENC.eot_token, 1.0, uniforms=u[:, a:a + 3]) for a in (0, 3)]
    assert whole == want == halves[0] + halves[1]
    assert len({tuple(c) for c in want}) == 6  # the rows' draws differ

def test_the_finish_is_read_every_eight_tokens_not_every_token():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):  # values read back by the host: on a GPU each waits for the device
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
            return func(*args, **(kwargs or {}))
    model, prompt = _tiny_model(), ENC.encode(EX["question"] + "\n")
    with Reads():
        out = caopd.sample(model, [prompt] * 3, 24, ENC.eot_token, 1.0, generator=torch.Generator().manual_seed(0))
    assert all(len(c) == 24 for c in out)  # random weights: no row ends early, so 24 steps ran
    assert Reads.n == 2  # after tokens 8 and 16; at the last token the loop ends without asking

@torch.no_grad()  # as sample() runs them: a change of grad mode would compile the step again
def test_our_gpts_captured_decode_step_equals_the_eager_one(capsys):
    model = _tiny_model()
    prompts = [ENC.encode(arith.QUESTION.format(a=a, op="*", b=b) + "\n") for a, b in [(12, 3), (45, 67), (8, 91)]]
    eager, captured = (d(model, prompts, 12) for d in (caopd.gpt_decoder, captured_step.gpt_decoder))
    a, b, worst = eager(None), captured(None), 0.0
    for _ in range(11):
        nxt = a.argmax(-1)
        a, b = eager(nxt), captured(nxt)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    assert worst < 1e-5, worst  # float32 rounding
    for temperature in (0.0, 1.0):
        want = caopd.sample(model, prompts, 12, ENC.eot_token, temperature, generator=torch.Generator().manual_seed(1))
        got = caopd.sample(model, prompts, 12, ENC.eot_token, temperature, generator=torch.Generator().manual_seed(1),
                           decoder=captured_step.decoder(model))
        assert got == want
    # compiled once for these shapes, not per call, and said; nearby cache lengths share one compiled step
    assert capsys.readouterr().out.count("compiled the rollouts' decode step in") == 1
    assert captured_step.cache_length(len(prompts[0]), 12) == captured_step.cache_length(len(prompts[0]), 16)
    caopd.sample(model, prompts, 16, ENC.eot_token, 0.0, decoder=captured_step.decoder(model))
    assert capsys.readouterr().out.count("compiled the rollouts' decode step in") == 0

def _cache_of(decode):
    return inspect.getclosurevars(decode).nonlocals["cache"]

@torch.no_grad()
def test_hugging_face_static_cache_and_captured_step(tiny_hf, capsys):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [11, 12, 13], [14, 15, 16, 17]]  # left padding, a shared prompt
    T, new = 6, 20
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0)[:, T:].tolist()
    end = 1  # a token these rows never emit (checked): every row runs all 20 steps
    assert all(end not in g for g in generated)
    captured = captured_step.decoder(model)
    assert caopd.sample(model, prompts, new, end, temperature=0, decoder=hf.decoder) == generated  # static cache, eager
    assert caopd.sample(model, prompts, new, end, temperature=0, decoder=captured) == generated
    # other prompts of the same shape: the same compiled step (each call has its own cache and model copy)
    other = [[p + 20 for p in prompt] for prompt in prompts]
    ids2 = torch.tensor([[0] * (T - len(p)) + p for p in other])
    want = model.generate(ids2, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=0)[:, T:].tolist()
    assert caopd.sample(model, other, new, end, temperature=0, decoder=captured) == want != generated
    sampled = [caopd.sample(model, prompts, new, end, 1.0, generator=torch.Generator().manual_seed(2), decoder=d)
               for d in (hf.decoder, captured)]
    assert sampled[0] == sampled[1] and sampled[0][1] != sampled[0][2]  # same uniforms; the shared prompt's rows differ
    # the captured step's logits are the eager step's, and a full forward's, to float32 rounding
    eager, captured = (d(model, prompts, new) for d in (hf.decoder, captured))
    a, b, worst = eager(None), captured(None), 0.0
    for t in range(new - 1):
        nxt = torch.tensor([g[t] for g in generated])
        a, b = eager(nxt), captured(nxt)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    full = model(torch.tensor([prompts[0] + generated[0][:new - 1]])).logits[0, -1]
    torch.testing.assert_close(a[0], full, rtol=1e-5, atol=1e-5)
    assert worst < 1e-5, worst
    assert capsys.readouterr().out.count("compiled the rollouts' decode step in") == 1
    # the cache: one allocation for the call (its length rounded up to 64), in the compute dtype, as
    # memory.kv_bytes counts it
    for dtype, ctx in ((torch.float32, contextlib.nullcontext()), (torch.bfloat16, torch.autocast("cpu", torch.bfloat16))):
        with ctx:
            cache = _cache_of(hf.decoder(model, prompts, new))
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        assert {t.dtype for t in tensors} == {dtype} and {t.shape[2] for t in tensors} == {64}
        assert sum(t.nbytes for t in tensors) == len(prompts) * 64 * memory.kv_bytes(model, dtype)
        assert memory.sampling_bytes(model, T, new, dtype) > 64 * memory.kv_bytes(model, dtype)

def _free(monkeypatch, rows, per_row=2**20):
    """memory.free_memory that leaves room for `rows` rows of per_row bytes beyond the toy's stage 1
    training state (see memory.fit_batches)."""
    import train_small
    model = caopd.GPT(caopd.GPTConfig(vocab_size=ENC.n_vocab, block_size=train_small.block_size))
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(memory, "sampling_bytes", lambda *a: per_row)
    monkeypatch.setattr(memory, "free_memory", lambda device: 16 * params + (rows + 0.5) * per_row / 0.9)

def test_eval_and_rollout_batches_that_do_not_fit(tmp_path, capsys, monkeypatch):
    import train_small
    _free(monkeypatch, rows=7)
    for arg in ("--eval_batch=500", "--rollout_batch=16"):
        code, out, err = _main(capsys, "--smoke=True", arg, f"--out_dir={tmp_path / 'out'}")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{arg}: does not fit in memory (1.0 MiB per row for a prompt of up to 16 + 12 tokens, 7.5 MiB " \
               f"of cpu's memory free for it): the largest that fits is 7" in err, err
        assert not (tmp_path / "out").exists()  # before anything is trained or written
    # the automatic values are lowered, said, and change no rollout (each row draws its own numbers)
    train_small.main(["--smoke=True", f"--out_dir={tmp_path / 'low'}"])
    out = capsys.readouterr().out
    assert "note: eval_batch lowered to 7 rows a call" in out and "note: rollout_batch lowered to 7 rows" in out
    monkeypatch.undo()
    train_small.main(["--smoke=True", f"--out_dir={tmp_path / 'all'}"])
    low, full = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("low", "all"))
    assert (low["config"]["eval_batch"], low["config"]["rollout_batch"]) == (7, 7)
    assert (full["config"]["eval_batch"], full["config"]["rollout_batch"]) == (16, 16)
    assert low["models"] == full["models"]

def test_the_loss_chunk_is_sized_for_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert caopd.loss_chunk(10_000, 151_936, cpu) == 55 and caopd.loss_chunk(20, 331, cpu) == 20  # 2^23 logits
    # a GPU: as many rows as three float32 (rows, V) buffers fit in an eighth of the free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**30)
    assert memory.loss_chunk(100_000, 128_256, torch.device("cuda")) == (63 * 2**30 // 8) // (12 * 128_256) == 5_494
    assert memory.loss_chunk(4_096, 128_256, torch.device("cuda")) == 4_096
    assert memory.loss_chunk(10_000, 151_936, cpu) == caopd.loss_chunk(10_000, 151_936, cpu)

# -----------------------------------------------------------------------------
# calibration a researcher can trust: selective prediction, bootstrap intervals, recalibration, baselines

import itertools  # noqa: E402 (this section's own)

import calibration  # noqa: E402

def _exact(v):
    return pytest.approx(v, rel=0, abs=1e-12)

def _aurc_over_every_order(correct, confidence):
    """AURC averaged over every order of the answers that puts a more confident one first: each
    order's mean over k of (errors among the first k) / k."""
    n, total, orders = len(correct), 0.0, 0
    for order in itertools.permutations(range(n)):
        if all(confidence[order[i]] >= confidence[order[i + 1]] for i in range(n - 1)):
            errors = list(itertools.accumulate(1 - correct[i] for i in order))
            total += sum(e / (k + 1) for k, e in enumerate(errors)) / n
            orders += 1
    return total / orders

def test_aurc_with_ties_is_the_mean_over_every_order_of_the_ties():
    correct, confidence = [1, 0, 1, 0, 0, 1, 1], [0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.2]
    brute = _aurc_over_every_order(correct, confidence)  # 2! x 4! = 48 orders
    # by hand: the 0.9 pair is wrong at rate 1/2, the 0.5 group too, 0.2 never: the expected errors
    # after k = 1..7 answers are .5, 1, 1.5, 2, 2.5, 3, 3
    assert brute == _exact((6 * 0.5 + 3 / 7) / 7)
    assert caopd.calibration_metrics(correct, confidence)["aurc"] == _exact(brute)
    coverage, risk = calibration.risk_coverage(correct, confidence)
    assert coverage[-1] == 1.0 and risk.mean().item() == _exact(brute)
    ones = torch.ones(1, 7, dtype=torch.float64)
    assert calibration.metrics_of_resamples(correct, confidence, ones)["aurc"].item() == _exact(brute)
    # no ties: one order; a constant confidence: the error rate at every coverage
    assert caopd.calibration_metrics([1, 0, 0], [0.9, 0.5, 0.1])["aurc"] == _exact((0 + 1 / 2 + 2 / 3) / 3)
    assert caopd.calibration_metrics([1, 0, 0, 1, 1], [1.0] * 5)["aurc"] == _exact(0.4)

def test_accuracy_at_a_coverage_that_cuts_a_tie_group():
    correct, confidence = [1, 1, 0, 1, 0], [0.9, 0.7, 0.7, 0.7, 0.2]
    at = lambda coverage: calibration.accuracy_at_coverage(correct, confidence, coverage)
    # 50%: 2.5 answers: the 0.9 one (right) and 1.5 of the 0.7 group, wrong at rate 1/3: 0.5 errors
    assert at(0.5) == _exact(1 - 0.5 / 2.5)
    # 80%: 4 answers, the whole group: 1 error; 40%: 2 answers, one of the group: 1/3 error
    assert at(0.8) == _exact(0.75) and at(0.4) == _exact(1 - (1 / 3) / 2) and at(1.0) == _exact(0.6)
    ones = torch.ones(1, 5, dtype=torch.float64)
    out = calibration.metrics_of_resamples(correct, confidence, ones, coverages=(0.4, 0.5))
    assert out["accuracy_at_50"].item() == _exact(0.8) and out["accuracy_at_40"].item() == _exact(5 / 6)

def test_every_resample_has_the_metrics_of_its_questions():
    """metrics_of_resamples (sums over the distinct confidences) against calibration_metrics and
    accuracy_at_coverage on each resample written out question by question."""
    import random
    rng = random.Random(1)
    conf = [rng.randrange(11) / 10 for _ in range(300)]
    correct = [int(rng.random() < c) for c in conf]
    counts = calibration.resample_counts(300, 8, seed=3)
    assert counts.sum(1).tolist() == [300.0] * 8
    out = calibration.metrics_of_resamples(correct, conf, counts)
    for r in range(8):
        drawn = [i for i in range(300) for _ in range(int(counts[r, i]))]
        y, c = [correct[i] for i in drawn], [conf[i] for i in drawn]
        m = caopd.calibration_metrics(y, c)
        for k in calibration.METRICS:
            assert out[k][r].item() == _exact(m[k]), k
        assert out["accuracy_at_80"][r].item() == _exact(calibration.accuracy_at_coverage(y, c, 0.8))

def _records(correct, confidence):
    return [{"id": str(i), "correct": bool(y), "confidence": c}
            for i, (y, c) in enumerate(zip(correct, confidence))]

def test_a_bootstrap_interval_holds_its_point_and_narrows_as_questions_grow():
    import random
    rng = random.Random(0)
    conf = [rng.randrange(11) / 10 for _ in range(100)]
    correct = [int(rng.random() < 0.2 + 0.6 * c) for c in conf]
    widths = []
    for copies in (1, 4, 16):  # the same answers, more of them: the same point, a narrower interval
        records = _records(correct * copies, conf * copies)
        m = calibration.summarize({"m": (None, records)}, 400, seed=0, pairs=())["models"]["m"]
        for k in ("accuracy", "brier", "auroc", "aurc", "accuracy_at_50"):
            assert m[k]["low"] <= m[k]["value"] <= m[k]["high"], k
        assert m["accuracy"]["value"] == _exact(sum(correct) / 100)
        widths.append({k: m[k]["high"] - m[k]["low"] for k in m})
    for k in ("accuracy", "brier", "auroc", "aurc"):  # as 1 / sqrt(n): about half for 4x the questions
        assert 0.35 < widths[1][k] / widths[0][k] < 0.65 and 0.35 < widths[2][k] / widths[1][k] < 0.65, k
    # accuracy's interval against the normal approximation, +-1.96 sqrt(p (1 - p) / n)
    p = sum(correct) / 100
    assert widths[2]["accuracy"] == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 1600), rel=0.15)

def test_summary_pairs_the_models_on_the_same_resamples():
    correct = [1, 0, 1, 1, 0, 1, 0, 1] * 25
    opd = _records(correct, [1.0] * 200)
    ranked = _records(correct, [0.9 if y else 0.3 for y in correct])
    s = calibration.summarize({"opd": (None, opd), "caopd": (None, ranked)}, 300, seed=0)
    d = s["differences"]["caopd - opd"]
    assert d["accuracy"] == {"value": 0.0, "low": 0.0, "high": 0.0}  # the same answers in every resample
    assert d["auroc"]["value"] == _exact(0.5) and d["auroc"]["low"] == _exact(0.5)  # 1.0 - 0.5 in each
    assert d["ece"]["high"] < 0 and s["models"]["opd"]["auroc"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert json.loads(json.dumps(s)) == s and s["n"] == 200 and s["n_resamples"] == 300
    table = calibration.format_table(s)
    assert "300 resamples of the 200 questions (seed 0)" in table
    auroc = r"^AUROC +0\.500 \[0\.500, 0\.500\] +1\.000 \[1\.000, 1\.000\] +\+0\.500 \[\+0\.500, \+0\.500\]$"
    assert re.search(auroc, table, re.M), table
    assert calibration.summarize({"opd": (None, opd), "caopd": (None, ranked)}, 300, seed=0) == s  # seeded
    with pytest.raises(ValueError, match="did not answer the same questions"):
        calibration.summarize({"opd": (None, opd), "caopd": (None, ranked[::-1])}, 10)

def test_isotonic_on_a_hand_case():
    correct, confidence = [0, 1, 1, 0, 1, 0, 1, 1], [0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.8, 0.8]
    # tied confidences pooled: 0.1 -> 0/1, 0.2 -> 2/2, 0.3 -> 1/2, 0.4 -> 0/1, 0.8 -> 2/2; 0.2 .. 0.4
    # break the order and pool into 3 / 5; between 0.4 and 0.8 the map is linear, outside them flat
    f = calibration.isotonic(correct, confidence)
    got = f([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]).tolist()
    assert got == pytest.approx([0.0, 0.0, 0.6, 0.6, 0.6, 0.8, 1.0, 1.0], rel=0, abs=1e-12)
    assert calibration.isotonic([1, 0, 1], [1.0] * 3)([0.2, 1.0]).tolist() == pytest.approx([2 / 3] * 2)

def test_platt_on_a_constant_confidence_model_and_at_its_optimum():
    # OPD's case: 1.0 stated everywhere, 7 of 10 right: no ranking, one value, the split's accuracy
    correct = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    f = calibration.platt(correct, [1.0] * 10)
    assert f([1.0, 0.5, 0.0]).tolist() == pytest.approx([0.7] * 3, rel=0, abs=1e-9)
    assert caopd.calibration_metrics(correct, f([1.0] * 10).tolist())["auroc"] == 0.5
    assert calibration.platt([1] * 5, [1.0] * 5)([1.0]).item() > 0.999  # every one right: the map runs to 1
    # a ranking model: at the fit, the mapped confidences add up to the right answers (the intercept's
    # optimum), their errors are uncorrelated with logit(c) (the slope's, to the tiny ridge), and the
    # ranking is the stated one
    import random
    rng = random.Random(0)
    conf = [rng.randrange(11) / 10 for _ in range(500)]
    correct = [int(rng.random() < 0.1 + 0.5 * c) for c in conf]
    p = calibration.platt(correct, conf)(conf)
    y = torch.tensor(correct, dtype=torch.float64)
    x = torch.logit(torch.tensor(conf, dtype=torch.float64).clamp(1e-3, 1 - 1e-3))
    assert abs((p - y).sum().item()) < 1e-6 and abs(((p - y) * x).sum().item()) < 1e-2
    auroc = lambda c: caopd.calibration_metrics(correct, c)["auroc"]
    assert auroc(p.tolist()) == _exact(auroc(conf)) and auroc(conf) > 0.6

def test_recalibration_fitted_on_one_split_never_reads_the_scored_one(monkeypatch):
    import random
    rng = random.Random(2)
    fit_conf = [rng.randrange(11) / 10 for _ in range(400)]
    fit_correct = [int(rng.random() < 0.6 * c) for c in fit_conf]
    scored_conf = [rng.randrange(11) / 10 for _ in range(300)]
    for fitter in (calibration.platt, calibration.isotonic):
        f = fitter(fit_correct, fit_conf)
        before = f(scored_conf).tolist()
        # whatever the scored verdicts are, the map is the same: it is the fitting split's alone
        for scored_correct in ([0] * 300, [1] * 300):
            assert caopd.calibration_metrics(scored_correct, f(scored_conf).tolist())["n"] == 300
            assert f(scored_conf).tolist() == before
        flipped = [1 - y for y in fit_correct]
        assert fitter(flipped, fit_conf)(scored_conf).tolist() != before  # it reads its own split
    # baselines' calibration questions: held out from training as the scored ones are, none of them, distinct
    monkeypatch.setattr(experiments, "n_calib", 300)
    monkeypatch.setattr(experiments, "calib_seed", 1)
    experiments.calibration_questions.cache_clear()
    calib = experiments.calibration_questions(0, 1000, "+*", None)
    experiments.calibration_questions.cache_clear()
    scored = {ex["question"] for ex in arith.split(0, 1000)[0]}
    assert len(calib) == len({ex["question"] for ex in calib}) == 300
    assert not scored & {ex["question"] for ex in calib} and all(arith.is_held(0, ex["id"]) for ex in calib)

def test_self_consistency_is_the_share_of_samples_that_give_the_greedy_answer():
    same = experiments.same_arith_answer
    greedy = ["Answer: 0322\nConfidence: 0.9", "no answer\nConfidence: 1.0"]
    samples = [["Answer: 322", "Answer: 0321\nConfidence: 0.9", "garbage", "Answer: 0322\nConfidence: 0.1"],
               ["no answer", "no answer", "Answer: 5", "Confidence: 1.0"]]
    # no answer agrees with nothing, not even with no answer
    assert calibration.self_consistency_confidence(greedy, samples, same) == [0.5, 0.0]
    assert not same("Answer: 7\nConfidence: Answer: 8", "Answer: 8")  # the answer before the confidence label

def test_baselines_bad_settings_are_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    where = [f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"]
    script = os.path.join(HERE, "experiments.py")
    r = subprocess.run([sys.executable, script, "baselines", "--n_calib=199", *where], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("experiments.py: error: --n_calib=199: ") and "at least 200" in r.stderr
    # in this process: the calibration questions' stream is the scored ones'
    monkeypatch.setattr(experiments, "CLI", {})  # main sets these; monkeypatch puts them back
    monkeypatch.setattr(experiments, "calib_seed", experiments.calib_seed)
    with pytest.raises(SystemExit) as e:
        experiments.main(["baselines", "--calib_seed=0", *where])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--calib_seed=0: " in err, err
    assert "--data_seed=0" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing trained or written

# -----------------------------------------------------------------------------
# one_step.py: one question through one distillation step, and --smoke with any model

def test_one_step_shows_what_each_method_trains_on(tmp_path, capsys):
    import one_step
    one_step.main(["--smoke=True", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    opd, caopd_part = out.split("===== OPD: ")[1].split("===== CAOPD: ")
    right, k = map(int, re.search(r"P_acc = (\d+) / (\d+)", opd).groups())
    assert (right, k) == tuple(map(int, re.search(r"P_acc = (\d+) / (\d+)", caopd_part).groups()))
    assert out.count("\n  right  ") + out.count("\n  wrong  ") == k == 4  # the K rollouts with their verdicts
    p = f"{right / k:.1f}"  # the one decimal the toy states
    assert "Confidence: 1.0\nNow answer" in opd and "Note:" not in opd  # OPD's teacher is shown certainty
    assert f"Confidence: {p}\nNote: The empirical confidence for this question is {p}." in caopd_part
    assert re.search(rf"the completion trained on \(rollout 1\): '.*Confidence: {re.escape(p)}'", caopd_part)
    for part in (opd, caopd_part):  # the two distributions over the values 0.0 ... 1.0 at the confidence
        rows = re.findall(r"^    (student|teacher) +((?:[01]\.\d\d ?){11})$", part, flags=re.M)
        assert [who for who, _ in rows] == ["student", "teacher"]
        assert all(sum(map(float, probs.split())) <= 1 + 11 * 0.005 for _, probs in rows)  # rounded probabilities
        assert "<- the confidence" in part

def test_smoke_works_with_a_hugging_face_model_out_of_the_box(tiny_hf, tmp_path):
    """Its one-digit sums take more than the toy's 12 tokens with a BPE tokenizer: --smoke raises
    max_new_tokens to the shortest complete answer, where no setting asks for another."""
    r = _run(f"--init_from={tiny_hf}", "--smoke=True", "--method=caopd", "--steps=1", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "o" / "results.json").read_text())["config"]
    assert cfg["max_new_tokens"] > 12
    r = _run(f"--init_from={tiny_hf}", "--smoke=True", "--max_new_tokens=12", f"--out_dir={tmp_path / 'p'}")
    assert r.returncode == 2 and "--max_new_tokens=12: too short for the answer format" in r.stderr

# -----------------------------------------------------------------------------
# the first GPU run, made safe by reading: the captured step without the per-token copies, memory
# sized for what runs, and every torch requirements.txt admits

def _counted_step(monkeypatch, graphs):
    """captured.py's Hugging Face step compiled through bench.graph_counter (its aten graph, counted)."""
    monkeypatch.setitem(captured_step.COMPILED, hf.decode_step,
                        torch.compile(hf.decode_step, backend=bench.graph_counter(graphs), fullgraph=True))

@torch.no_grad()
def test_the_captured_hf_step_reads_grouped_keys_in_place_and_casts_no_weight(tiny_hf, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads  # grouped heads
    prompts, new, graphs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [11, 12, 13], [14, 15, 16, 17]], 12, []
    _counted_step(monkeypatch, graphs)
    eager, captured = hf.decoder(model, prompts, new), captured_step.decoder(model)(model, prompts, new)
    a, b, worst = eager(None), captured(None), 0.0
    for _ in range(new - 1):
        nxt = a.argmax(-1)
        a, b = eager(nxt), captured(nxt)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    assert worst < 1e-5, worst  # float32 rounding
    assert "clone" not in graphs[-1]["moves"] and graphs[-1]["input_casts"] == 0  # keys, values read in place
    assert model.config._attn_implementation == "sdpa"  # the copy's config names grouped_attention
    # under bfloat16 autocast over float32 weights: the matrices are cast once a call, not in the step
    with torch.autocast("cpu", torch.bfloat16):
        greedy = [caopd.sample(model, prompts, new, 1, temperature=0, decoder=d)
                  for d in (hf.decoder, captured_step.decoder(model))]
    assert greedy[0] == greedy[1]
    assert "clone" not in graphs[-1]["moves"] and graphs[-1]["input_casts"] == 0  # activations' casts only
    twin, head = captured_step.decode_copy(model)  # without autocast: the model's own tensors
    assert all(p is q for p, q in zip(twin.parameters(), model.parameters()))
    assert head is caopd.output_weight(model)

def test_a_sampling_calls_cache_and_model_copy_are_freed_when_it_returns(tiny_hf, monkeypatch):
    """Nothing of a call may outlive it (the backward pass comes next): not through a reference cycle
    (freed only when Python's collector runs), not even from a call that compiled the step."""
    import gc
    import weakref
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    made = []
    for module, name, index in ((hf, "static_cache", 1), (captured_step, "decode_copy", 0)):
        def recorded(*args, _f=getattr(module, name), _i=index):
            out = _f(*args)
            made.append(weakref.ref(out[_i]))
            return out
        monkeypatch.setattr(module, name, recorded)
    fast = torch.compile(hf.decode_step, backend="eager")  # dynamo's cycles without inductor's time
    monkeypatch.setitem(captured_step.COMPILED, hf.decode_step, fast)
    gc.disable()
    try:
        captured = captured_step.decoder(model)
        for decoder in (hf.decoder, captured, captured):  # a captured call that compiles, then one not
            made.clear()
            with torch.autocast("cpu", torch.bfloat16):
                caopd.sample(model, [[5, 6, 7]] * 4, 6, 1, temperature=0, decoder=decoder)
            assert made and all(r() is None for r in made)
    finally:
        gc.enable()

def test_the_captured_steps_cache_lengths_come_in_a_few_buckets():
    lengths = {n: captured_step.cache_length(n - 1024, 1024) for n in range(1025, 4097)}
    assert all(n <= L <= 1.25 * n and L % 64 == 0 for n, L in lengths.items())
    assert sorted(set(lengths.values())) == [1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096]  # 4 an octave
    assert {captured_step.cache_length(p, 12) for p in range(1, 53)} == {64}

def test_the_sampling_bound_covers_a_captured_calls_peak():
    # one captured call (its first call compiles, the second is measured: bench.sampling_memory_worker)
    m = bench.run_worker(worker="sample_memory", N=64, V=32, d=256, layers=2, decoder="captured")
    assert 0 < m["measured_mib"] <= m["bound_mib"], m

def test_decode_weights_and_the_captured_cache_are_in_the_bound(monkeypatch):
    model = bench.llama(64, 2)
    params = sum(p.numel() for p in model.parameters())
    assert memory.decode_weight_bytes(model, torch.bfloat16) == 2 * params  # autocast's or decode_copy's
    assert memory.decode_weight_bytes(model, torch.float32) == 0
    eager, captured = (memory.sampling_bytes(model, 320, 1024, torch.bfloat16, c) for c in (False, True))
    per_position = memory.kv_bytes(model, torch.bfloat16) + 4 * model.config.num_attention_heads  # + scores
    assert captured - eager == (1536 - 1344) * per_position  # its longer cache
    # auto: the captured step for our GPT on a GPU only, never (yet) for a Hugging Face model
    monkeypatch.setattr(cli, "resolve_device", lambda device: device)  # a GPU, as far as captures() asks
    cfg = lambda **kw: type("C", (), {"compile_decode": "auto", "device": "cuda", "fsdp": False, **kw})
    assert models.captures(cfg(init_from="scratch")) and not models.captures(cfg(init_from="Qwen/Qwen3-0.6B"))
    assert models.captures(cfg(init_from="Qwen/Qwen3-0.6B", compile_decode="true"))

def test_a_torch_without_the_dtype_out_product_imports_and_runs_the_loss():
    """torch before 2.8 has no mm/addmm out_dtype overload: its argument parser refuses out_dtype (a
    TypeError) and the dispatcher knows no such operator (a RuntimeError)."""
    code = """
import torch
def missing(*args, **kwargs):
    raise RuntimeError("operator aten::addmm.dtype_out does not exist")
torch._C._dispatch_has_kernel_for_dispatch_key = missing
for name in ("mm", "addmm"):
    def refusing(*args, _f=getattr(torch, name), **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError(f"{name}() received an invalid combination of arguments - got (out_dtype=...)")
        return _f(*args, **kwargs)
    setattr(torch, name, refusing)
import caopd
g = torch.Generator().manual_seed(0)
hs = torch.randn(40, 16, generator=g, requires_grad=True)
ws = torch.randn(300, 16, generator=g, requires_grad=True)
ht, wt = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
with torch.autocast("cpu", torch.bfloat16):
    loss = caopd.fused_linear_kl(hs, ws, ht, wt, chunk_size=16)
loss.backward()
ref = caopd.linear_kl_reference(hs.double(), ws.double(), ht.double(), wt.double())
assert abs(loss.item() - ref.item()) < 0.05 * ref.item(), (loss.item(), ref.item())
assert not caopd._dtype_out("mm", "cpu") and not caopd._dtype_out("addmm", "cpu")
print("ok", ws.grad.abs().sum().item() > 0)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "True"], r.stderr[-2000:]

def test_the_loss_writes_float32_logits_where_the_device_can(monkeypatch):
    """Where the product writes float32 from bfloat16 operands (CUDA from torch 2.10), the logits are not
    rounded to bfloat16 first; where it refuses (CUDA 2.8-2.9), the rounded path. The CPU has no such
    kernel, so both are simulated here: the first by the bfloat16 operands multiplied in float32."""
    mm, addmm = torch.mm, torch.addmm
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(64, 32, generator=g) / 32 ** 0.5, torch.randn(500, 32, generator=g) * 2
    ht = hs + 0.3 * torch.randn(64, 32, generator=g) / 32 ** 0.5
    wt = ws + 0.3 * torch.randn(500, 32, generator=g)
    exact = caopd.linear_kl_reference(*(t.bfloat16().double() for t in (hs, ws, ht, wt)))  # bfloat16 operands

    def loss_with(fake_mm, fake_addmm):
        caopd._dtype_out.cache_clear()
        monkeypatch.setattr(torch, "mm", fake_mm)
        monkeypatch.setattr(torch, "addmm", fake_addmm)
        try:
            w = ws.clone().requires_grad_()
            with torch.autocast("cpu", torch.bfloat16):
                loss = caopd.fused_linear_kl(hs, w, ht, wt, chunk_size=16)
            loss.backward()
            return loss.item(), caopd._dtype_out("mm", "cpu"), caopd._dtype_out("addmm", "cpu"), w.grad
        finally:
            monkeypatch.setattr(torch, "mm", mm)
            monkeypatch.setattr(torch, "addmm", addmm)
            caopd._dtype_out.cache_clear()

    def refuses(f):
        def call(*args, out_dtype=None, **kwargs):
            if out_dtype is not None:
                raise RuntimeError("out_dtype must be the same as the inputs' dtype")
            return f(*args, **kwargs)
        return call

    def float32_out(f):
        def call(*args, out_dtype=None, **kwargs):
            if out_dtype is not None:
                args = [a.to(out_dtype) if a.dtype == torch.bfloat16 else a for a in args]
            return f(*args, **kwargs)
        return call
    rounded, *has_rounded, grad_r = loss_with(refuses(mm), refuses(addmm))
    direct, *has_direct, grad_d = loss_with(float32_out(mm), float32_out(addmm))
    assert has_rounded == [False, False] and has_direct == [True, True]
    assert abs(direct - exact.item()) < abs(rounded - exact.item()) and abs(direct - exact.item()) < 1e-5
    torch.testing.assert_close(grad_d, grad_r, rtol=0.05, atol=1e-4)

# -----------------------------------------------------------------------------
# issue 28, runs that survive, honestly: a run's identity (out_dir/run.json) is in every file it
# writes and checked in every file it reads, before anything is written; metrics.jsonl is exactly
# the run's; one line everywhere. A run is stopped at a named place (CAOPD_STOP_AT, cli.stop_at),
# not at a moment: SIGKILL there, or with "!int" Ctrl-C's KeyboardInterrupt.

TINY = ("--smoke=True", "--base_steps=6", "--steps=4", "--n_eval=4", "--workers=1", "--log_every=1")

def _tiny(out, *args, stop=None, pre=None):
    """train_small.py TINY args into out, in a new interpreter; stop: CAOPD_STOP_AT."""
    env = {k: v for k, v in os.environ.items() if k != "CAOPD_STOP_AT"}
    return subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *TINY, *args,
                           f"--out_dir={out}"], capture_output=True, text=True, timeout=600, preexec_fn=pre,
                          env={**env, "CAOPD_STOP_AT": stop} if stop else env)

def _tiny_here(capsys, out, *args, stop=None):
    """_tiny in this process (its imports done: seconds faster). stop: Ctrl-C ("!int") only, or a
    place only a forked method's process reaches (a SIGKILL here would take pytest along).
    Returns (exit code, stdout, stderr)."""
    import run_dir
    import train_small
    os.environ.pop("CAOPD_STOP_AT", None)
    os.environ.update({"CAOPD_STOP_AT": stop} if stop else {})
    try:
        train_small.main([*TINY, *args, f"--out_dir={out}"])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.environ.pop("CAOPD_STOP_AT", None)
        run_dir.release_out_dir()  # as this process's end would
    o = capsys.readouterr()
    return code, o.out, o.err

def _one_error(code, err, want_code):
    """Exit code want_code and one error line (above it only progress bars), which it returns."""
    errors = [l for l in err.splitlines() if "error:" in l]
    assert code == want_code and len(errors) == 1 and "Traceback" not in err, (code, err[-2000:])
    return errors[0]

def _same_run(out, ref):
    assert _without_seconds(out)["models"] == _without_seconds(ref)["models"]
    assert (out / "completions.jsonl").read_bytes() == (ref / "completions.jsonl").read_bytes()
    assert _metrics(out) == _metrics(ref)  # every logged step once, in order, none of another run

@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out"
    r = _tiny(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(_metrics(out)) == 6 + 1 + 2 * (4 + 1)  # every step logged, and each model's evaluation
    return out

@pytest.fixture(scope="module")
def tiny_killed(tmp_path_factory):
    """A run killed in CaOPD (--workers=1): ckpt.pt at caopd step 2, opd.pt, the cached base."""
    out = tmp_path_factory.mktemp("killed") / "out"
    assert _tiny(out, stop="checkpoint caopd 2").returncode == -9
    return out

def test_survive_1_a_resume_continues_its_own_run_never_another(tiny_reference, tmp_path, capsys):
    """A finished run (seed 0) in out; a --seed=1 run started there, killed in stage 0 before its
    first checkpoint, resumes to its own end, seed 1's. The finished run is moved aside, whole."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_reference, out)
    r = _tiny(out, "--seed=1", stop="log train base 0")
    assert r.returncode == -9 and "held another run's files" in r.stdout
    moved, = out.glob("previous-*")
    _same_run(moved, tiny_reference)
    assert not (out / "results.json").exists()
    code, stdout, err = _tiny_here(capsys, out, "--seed=1", "--init_from=resume")
    assert code == 0, err[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert f"resuming run {run['id']} from its start: it stopped before its first checkpoint" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 1 and res["models"] != _without_seconds(tiny_reference)["models"]
    steps = [(x["kind"], x["stage"], x["step"]) for x in _metrics(out)]
    assert steps == [(x["kind"], x["stage"], x["step"]) for x in _metrics(tiny_reference)]  # each once
    header = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert header == {"kind": "run", "run": {"id": run["id"], "settings": run["settings"]}}
    assert torch.load(out / "caopd.pt", weights_only=True)["run"] == header["run"]

def test_survive_1_a_move_aside_cut_short_is_finished_by_the_next_run(tiny_reference, tmp_path, capsys):
    """Stopped after moving a first file aside, run.json (moved last) still names the run: its resume
    is refused, the new run started again finishes the move, and the moved run is whole."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_reference, out)
    code, _, err = _tiny_here(capsys, out, stop="move aside!int")
    assert "interrupted before the run began" in _one_error(code, err, 130) and (out / "run.json").exists()
    code, _, err = _main(capsys, *TINY, "--init_from=resume", f"--out_dir={out}")
    assert "holds part of run" in _one_error(code, err, 2)
    code, _, err = _tiny_here(capsys, out)
    assert code == 0, err[-2000:]
    moved, = out.glob("previous-*")
    _same_run(moved, tiny_reference)
    assert _without_seconds(out)["models"] == _without_seconds(tiny_reference)["models"]  # the new run's end

def test_survive_2_a_kill_inside_an_export_leaves_a_folder_the_next_run_uses(tiny_hf, tmp_path, capsys):
    """Killed between an export's two renames (hf is then hf.old; here the student's export after the
    checkpoint's), the resume puts it back and ends with a whole export of its run; an hf.old half
    removed is no obstacle."""
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    run = (f"--init_from={tiny_hf}", "--task=science", f"--data={fixture}", f"--eval_data={fixture}",
           "--base_steps=0", "--steps=1", "--max_new_tokens=16", "--n_eval=6", "--K=2", "--method=opd")
    out = tmp_path / "out"
    assert _tiny(out, *run, stop="export hf moved").returncode == -9
    assert not (out / "hf").exists() and (out / "hf.old" / "model.safetensors").exists()
    code, _, err = _tiny_here(capsys, out, *run, "--init_from=resume")
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in out.glob("hf*")) == ["hf"]
    run = json.loads((out / "run.json").read_text())
    assert json.loads((out / "hf" / "run.json").read_text())["run"] == {k: run[k] for k in ("id", "settings")}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(out / "hf"), AutoTokenizer.from_pretrained(out / "hf")
    (out / "hf.old").mkdir()  # what a kill while removing it leaves: part of it
    (out / "hf.old" / "config.json").write_text("{}")
    models.export_hf(model, tok, str(out / "hf"), "float32")
    assert sorted(p.name for p in out.glob("hf*")) == ["hf"] and (out / "hf" / "model.safetensors").exists()

def test_survive_3_metrics_are_the_runs_after_kills_and_resumes(tiny_reference, tiny_killed, tmp_path,
                                                                capsys):
    import shutil
    # a rerun into a finished out_dir, killed before its first OPD checkpoint, resumed: its base was reused,
    # so it has no stage 0 line, and every other line once
    out = tmp_path / "out"
    shutil.copytree(tiny_reference, out)
    assert _tiny(out, stop="log train opd 0").returncode == -9
    code, _, err = _tiny_here(capsys, out, "--init_from=resume")
    assert code == 0, err[-2000:]
    assert _metrics(out) == [x for x in _metrics(tiny_reference)
                             if x["stage"] != "base" or x["kind"] == "eval"]
    assert _without_seconds(out)["models"] == _without_seconds(tiny_reference)["models"]
    # the cached base deleted before a resume in CaOPD: trained again, with no line and no checkpoint (a
    # kill after it leaves CaOPD's), and the run ends as if nothing had happened
    out = tmp_path / "out2"
    shutil.copytree(tiny_killed, out)
    ck = (out / "ckpt.pt").read_bytes()
    for f in out.glob("base-*.pt"):
        f.unlink()
    r = _tiny(out, "--init_from=resume", stop="evaluate base")
    assert r.returncode == -9 and "training the base again" in r.stdout
    assert (out / "ckpt.pt").read_bytes() == ck
    code, _, err = _tiny_here(capsys, out, "--init_from=resume")
    assert code == 0, err[-2000:]
    _same_run(out, tiny_reference)

@pytest.mark.parametrize("file, bad, words", [
    ("ckpt.pt", lambda ck: {}, "ckpt.pt: has no 'stage'"),
    ("ckpt.pt", lambda ck: [1, 2], "ckpt.pt: holds a list, not a dict"),
    ("ckpt.pt", lambda ck: {k: v for k, v in ck.items() if k != "model"}, "ckpt.pt: has no 'model'"),
    ("ckpt.pt", lambda ck: {**ck, "model": {k: v[..., :64] for k, v in ck["model"].items()}},
     "ckpt.pt: its model's wte.weight is (321, 64), the settings make (321, 128)"),  # an --n_embd=64 run's
    ("ckpt.pt", lambda ck: {**ck, "model": {k: v.double() for k, v in ck["model"].items()}},
     "is torch.float64, not torch.float32"),
    ("ckpt.pt", lambda ck: {**ck, "run": {"id": "0123456789ab", "settings": "x"}},
     "ckpt.pt: written by run 0123456789ab, not by run"),
    ("base", lambda ck: {"weights": 1}, "has no 'model', 'settings'; delete it: the next run trains"),
    ("opd.pt", lambda ck: {"model": 1}, "opd.pt: has no 'config'"),
    ("opd.pt", b"half a file", "opd.pt: the checkpoint is truncated"),
    ("metrics.jsonl", b'{"kind": "run", "run": null}\n', "metrics.jsonl is of run None, not of run"),
])
def test_survive_4_every_file_read_is_checked_before_anything_is_written(tiny_killed, tmp_path, capsys, file,
                                                                       bad, words):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_killed, out)
    path = next(out.glob("base-*.pt")) if file == "base" else out / file
    if isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        torch.save(bad(torch.load(out / "ckpt.pt", weights_only=True)), path)
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "ckpt.pt", "lock")}
    code, _, err = _main(capsys, *TINY, "--init_from=resume", f"--out_dir={out}")
    assert words in _one_error(code, err, 2) and f"{out}/" in err
    assert {f: (out / f).read_bytes() for f in before} == before  # lock, metrics.jsonl, ckpt.pt as they were

def test_survive_4_a_method_checkpoint_side_by_side_and_a_truncated_model_are_one_line(tiny_hf, tmp_path,
                                                                                      capsys):
    import shutil
    out = tmp_path / "out"
    code, _, err = _tiny_here(capsys, out, "--workers=2", stop="checkpoint caopd 2")  # CaOPD's process dies
    assert _one_error(code, err, 1) and (out / "ckpt-opd.pt").exists()
    data = (out / "ckpt-opd.pt").read_bytes()
    (out / "ckpt-opd.pt").write_bytes(data[:len(data) // 2])
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "ckpt.pt", "lock")}
    code, _, err = _main(capsys, *TINY, "--workers=2", "--init_from=resume", f"--out_dir={out}")
    assert "ckpt-opd.pt: the checkpoint is truncated or corrupt" in _one_error(code, err, 2)
    assert {f: (out / f).read_bytes() for f in before} == before
    model = tmp_path / "model"
    shutil.copytree(tiny_hf, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:len(data) // 2])
    fixture = os.path.join(HERE, "data", "science", "fixture.jsonl")
    code, _, err = _main(capsys, f"--init_from={model}", "--task=science", f"--data={fixture}",
                         f"--eval_data={fixture}", f"--out_dir={tmp_path / 'o'}")
    assert "its .safetensors weights are truncated or corrupt" in _one_error(code, err, 2)
    assert not (tmp_path / "o").exists()

def test_survive_5_ctrl_c_anywhere_is_one_line_and_resumes(tiny_reference, tmp_path, capsys):
    """Ctrl-C in stage 0 (one method after the other, --workers=1), then, resumed, in the final
    evaluation: each one line and exit code 130, and the last resume ends as the uninterrupted run."""
    out = tmp_path / "out"
    for place in ("log train base 2", "evaluate caopd"):
        resume = ["--init_from=resume"] if place != "log train base 2" else []
        code, _, err = _tiny_here(capsys, out, *resume, stop=f"{place}!int")
        run = json.loads((out / "run.json").read_text())["id"]
        assert f"interrupted: --init_from=resume continues run {run} from its last checkpoint" in \
            _one_error(code, err, 130)
        assert not list(out.glob("*.tmp")) and not (out / "results.json").exists()
    code, _, err = _tiny_here(capsys, out, "--init_from=resume")
    assert code == 0, err[-2000:]
    _same_run(out, tiny_reference)

def test_survive_5_locks_disks_seeds_and_curves_are_one_line(tiny_reference, tmp_path, capsys, monkeypatch):
    import builtins
    import curves
    import resource
    import run_dir
    import signal
    import tempfile
    # a lock that is a folder; one of bytes that are no text (a run that did not empty it: taken over)
    (tmp_path / "a" / "lock").mkdir(parents=True)
    code, _, err = _main(capsys, *TINY, f"--out_dir={tmp_path / 'a'}")
    assert "a/lock is not a file" in _one_error(code, err, 2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "lock").write_bytes(b"\xff\xfe\x00 42")
    run_dir.check_not_locked(str(tmp_path / "b"))
    run_dir.take_out_dir(str(tmp_path / "b"))
    assert "the run of process \ufffd\ufffd\x00 42 ended without releasing it" in capsys.readouterr().out
    assert (tmp_path / "b" / "lock").read_text() == f"{os.getpid()}\n"
    run_dir.release_out_dir()
    # a read-only out_dir that holds a lock file (root writes anyway: its writes refused here)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "lock").write_text("")
    real_open, real_temp = builtins.open, tempfile.TemporaryFile
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: refused()
                        if str(f).startswith(str(ro)) and set(mode) & set("wa+")
                        else real_open(f, mode, *a, **k))
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, dir=None, **k: refused()
                        if str(dir).startswith(str(ro)) else real_temp(*a, dir=dir, **k))
    code, _, err = _main(capsys, *TINY, f"--out_dir={ro}")
    assert "cannot be created or written: Permission denied" in _one_error(code, err, 2)
    monkeypatch.undo()
    assert os.listdir(ro) == ["lock"]
    # seeds out of range
    code, _, err = _main(capsys, *TINY, "--seed=20000000000000", f"--out_dir={tmp_path / 'c'}")
    assert "--seed=20000000000000: must be in [0, 2^40)" in _one_error(code, err, 2)
    # a full disk (here: a file size limit): one line at the first checkpoint, no temporary left
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))
    r = _tiny(tmp_path / "full", pre=small_files)
    assert "full/ckpt.pt cannot be written (File too large)" in _one_error(r.returncode, r.stderr, 1)
    assert not list((tmp_path / "full").glob("*.tmp"))
    # curves.py on any line of any file; a PNG named .png
    lines = (tiny_reference / "metrics.jsonl").read_text().splitlines()
    train = json.loads(next(l for l in lines if '"stage": "opd"' in l))
    for change, words in ((dict(stated_confidence=None), ":3: its stated_confidence is null, not a finite"),
                          (dict(step="3"), ':3: its step is "3", not a whole number'),
                          (dict(p_acc=float("inf")), ":3: its p_acc is Infinity, not a finite number")):
        path = tmp_path / "m.jsonl"
        path.write_text("\n".join([lines[0], lines[1], json.dumps({**train, **change})]) + "\n")
        with pytest.raises(SystemExit) as e:
            curves.main([str(path), f"--out={tmp_path / 'c.png'}"])
        assert e.value.code == 2 and words in _one_error(2, capsys.readouterr().err, 2)
    with pytest.raises(SystemExit) as e:
        curves.main([str(tiny_reference / "metrics.jsonl"), f"--out={tmp_path / 'c.pdf'}"])
    assert "the curves are a PNG; name the file .png" in _one_error(e.value.code, capsys.readouterr().err, 2)
    assert not list(tmp_path.glob("c.*"))

def test_survive_6_the_interrupted_command_resumes_and_a_setting_that_changes_numbers_is_named(
        tiny_reference, tmp_path, capsys):
    import side_by_side
    import train_small
    out = tmp_path / "out"
    side = side_by_side.how_many(train_small.settings(smoke=True, device="cpu")) == 2  # two cores
    code, _, _ = _tiny_here(capsys, out, "--workers=0", stop="checkpoint caopd 2" + ("" if side else "!int"))
    assert code == (1 if side else 130)  # CaOPD's process killed: the run stops; or Ctrl-C
    for args, words in ((("--threads=2",), "--threads=2 (the run has 1)"),
                        (("--K=3",), "--K=3 (the run has 4)"),
                        (("--dtype=bfloat16",), "--dtype='bfloat16' (the run has 'auto', resolved to")):
        code, _, err = _main(capsys, *TINY, "--workers=0", *args, "--init_from=resume", f"--out_dir={out}")
        assert words in _one_error(code, err, 2) and "would change its numbers" in err
    # the interrupted command, its defaults spelled out; a setting that changes no number is taken and said
    spelled = ("--workers=0", "--dtype=auto", "--eval_batch=0", "--rollout_batch=0", "--export_dtype=auto",
               "--device=cpu", "--threads=1", "--ckpt_every=1")
    code, stdout, err = _tiny_here(capsys, out, *spelled, "--init_from=resume")
    assert code == 0, err[-2000:]
    assert "note: --ckpt_every=1: change no number of run" in stdout and "resuming" in stdout
    _same_run(out, tiny_reference)

def test_survive_7_a_tracker_that_fails_to_start_and_no_run_to_resume_leave_nothing(tmp_path, capsys):
    pytest.importorskip("wandb")
    out = tmp_path / "out"  # online without an API key: it stops before any network
    r = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *TINY, "--wandb_project=test",
                        f"--out_dir={out}"], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL, env=_wandb_env(tmp_path, mode="online"))
    assert "wandb failed to start" in _one_error(r.returncode, r.stderr, 2) and not out.exists()
    code, _, err = _main(capsys, *TINY, "--init_from=resume", f"--out_dir={out}")
    assert "no checkpoint to resume from" in _one_error(code, err, 2) and "without --init_from=resume" in err
    assert not out.exists()
