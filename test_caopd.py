"""Tests pinning down what readers of caopd.py get wrong. Run: python -m pytest -q test_caopd.py"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import caopd
from data import arith

HERE = os.path.dirname(os.path.abspath(__file__))
ENC = caopd.toy_tokenizer(arith.VOCAB_TEXT)

# -----------------------------------------------------------------------------
# metrics on hand-computed cases

def test_metrics_hand_case_with_a_tie():
    m = caopd.calibration_metrics([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.6])
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["mean_confidence"] == pytest.approx(0.575)
    assert m["ocg"] == pytest.approx(0.075)
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.16 + 0.36) / 4)
    # pairs (correct, incorrect): (.9,.2) (.9,.6) (.6,.2) win, (.6,.6) ties: strict SPR 3/4, AUROC 3.5/4
    assert m["spr"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(0.875)
    # bins: {.9: acc 1} -> .1 * 1/4; {.2: acc 0} -> .2 * 1/4; {.6, .6: acc .5} -> .1 * 2/4
    assert m["ece"] == pytest.approx(0.025 + 0.05 + 0.05)

def test_metrics_constant_confidence_model():
    m = caopd.calibration_metrics([1, 0, 0, 1, 1], [1.0] * 5)
    assert m["spr"] == 0.0 and m["auroc"] == 0.5  # always 1.00: no ranking at all
    assert m["ece"] == pytest.approx(0.4) and m["ocg"] == pytest.approx(0.4)
    assert m["brier"] == pytest.approx(0.4)

def test_metrics_empty_classes():
    for correct in ([1, 1, 1], [0, 0, 0]):
        m = caopd.calibration_metrics(correct, [0.2, 0.5, 0.9])
        assert m["spr"] == 0.0 and m["auroc"] == 0.5
    assert caopd.calibration_metrics([1, 1], [1.0, 1.0])["ece"] == 0.0

def test_metrics_bin_edges():
    assert caopd.calibration_metrics([0, 1], [0.0, 1.0])["ece"] == 0.0  # 0 in the first bin, 1 in the last
    # 0.3 belongs to [0.3, 0.4) together with 0.39 (floating point must not push it into [0.2, 0.3))
    assert caopd.calibration_metrics([1, 0], [0.3, 0.39])["ece"] == pytest.approx(abs(0.345 - 0.5))
    assert caopd.calibration_metrics([1, 0], [0.7, 0.79])["ece"] == pytest.approx(abs(0.745 - 0.5))

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
    (dict(teacher_hidden=torch.randn(5, 6)), "differ in N"),
    (dict(teacher_weight=torch.randn(49, 6)), "differ in V"),
    (dict(mask=torch.ones(36)), "mask must have shape"),
    (dict(student_hidden=torch.ones(37, 8, dtype=torch.long)), "student_hidden must be a 2-D floating"),
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

def test_confidence_values_are_single_tokens():
    for i in range(11):
        text = f"Answer: 12\nConfidence: {i / 10:.1f}"
        tokens = ENC.encode(text)
        assert ENC.decode([tokens[-1]]) == f" {i / 10:.1f}"
        assert ENC.decode(tokens) == text
    assert ENC.decode(ENC.encode("odd text: €")) == "odd text: €"  # anything else still encodes, by bytes

EX = {"id": "017+305", "question": "Solve 017+305 and end with your confidence.", "answer": 322,
      "reference": "Answer: 322", "kind": "add"}

def test_the_three_replacements_on_a_real_toy_prompt():
    rollout = "Answer: 322\nConfidence: 0.9"
    p_acc = caopd.empirical_confidence([1, 0, 0, 1, 0, 1, 0, 0], 8)[0]
    assert p_acc == 0.375
    completion, shown, note = caopd.with_empirical_confidence(rollout, p_acc, arith.DECIMALS)
    assert completion == "Answer: 322\nConfidence: 0.4"  # 1. the student completion
    opd = caopd.teacher_prompt("demo", EX["question"], EX["reference"], 1.0, None, arith.DECIMALS)
    ca = caopd.teacher_prompt("demo", EX["question"], EX["reference"], shown, note, arith.DECIMALS)
    assert opd == ("Solve 017+305 and end with your confidence.\nThis is an example for a response to the question:\n"
                   "Answer: 322\nConfidence: 1.0\nNow answer with a response of your own.\n")
    assert ca == ("Solve 017+305 and end with your confidence.\nThis is an example for a response to the question:\n"
                  "Answer: 322\nConfidence: 0.4\n"  # 2. the demonstrated confidence
                  "Note: The empirical confidence for this question is 0.4. Output this exact value in the "
                  "'Confidence:' field.\n"  # 3. the Note line
                  "Now answer with a response of your own.\n")
    # the edited completion continues the student prompt token by token and ends in one confidence token
    assert ENC.decode(ENC.encode(completion)[-1:]) == " 0.4"

def test_the_replacements_on_the_correct_solution_template():
    solution = "Answer: 322\nConfidence: 0.2"  # a verified rollout states its own confidence; it is replaced
    opd = caopd.teacher_prompt("correct_solution", EX["question"], solution, 1.0, None, 2)
    ca = caopd.teacher_prompt("correct_solution", EX["question"], solution, *caopd.with_empirical_confidence(solution, 0.625, 2)[1:], 2)
    assert opd == ("Solve 017+305 and end with your confidence.\nCorrect solution:\nAnswer: 322\nConfidence: 1.00\n"
                   "Correctly solve the original question.\n")
    assert "Correct solution:\nAnswer: 322\nConfidence: 0.62\n" in ca  # .2f of 0.625 (round half even)
    assert "Note: The empirical confidence for this question is 0.62." in ca
    assert "0.2" not in ca.replace("0.62", "")

def test_set_confidence_without_a_confidence_line():
    assert caopd.set_confidence("Answer: 3", 0.5, 1) == "Answer: 3\nConfidence: 0.5"
    assert caopd.set_confidence("Answer: 3\nConfidence: 0.9 Confidence: 0.1", 0.5, 1) == "Answer: 3\nConfidence: 0.5"
    assert caopd.set_confidence("", 1.0, 2) == "Confidence: 1.00"

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return caopd.GPT(caopd.GPTConfig(vocab_size=ENC.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()

def test_kv_cache_sampling_equals_full_forward_greedy():
    model = _tiny_model()
    prompts = [ENC.encode(caopd.student_prompt(arith.QUESTION.format(a=a, op="+", b=b))) for a, b in [(1, 2), (34, 5), (999, 0)]]
    with_cache = caopd.sample(model, prompts, 20, ENC.eot_token, temperature=0)
    without = caopd.sample(model, prompts, 20, ENC.eot_token, temperature=0, use_cache=False)
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
    prompt = ENC.encode(caopd.student_prompt(EX["question"]))
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
    assert caopd.verify(EX, text) is ok

@pytest.mark.parametrize("text,value", [
    ("Answer: 3", None), ("Answer: 3\nConfidence:", None), ("Confidence: high", None),
    ("Confidence: 0.7", 0.7), ("Confidence: 0.2\nConfidence: 0.9", 0.9), ("Confidence: 1.7", 1.0),
    ("Confidence: 85%", 0.85), ("Confidence: .5", 0.5), ("Confidence:0.30", 0.3),
])
def test_parse_confidence(text, value):
    assert caopd.parse_confidence(text) == value

def test_split_is_deterministic_and_held_out():
    held, sample_train = arith.split(3, 200)
    assert [e["id"] for e in held] == [e["id"] for e in arith.split(3, 200)[0]]
    import random
    ids = {e["id"] for e in held}
    assert not ids & {e["id"] for e in sample_train(random.Random(0), 2000)}
    assert len({len(ENC.encode(caopd.student_prompt(e["question"]))) for e in held}) == 1  # one batch

# -----------------------------------------------------------------------------
# the script: bad settings, and one end-to-end smoke run

def _run(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)

@pytest.mark.parametrize("arg,words", [
    ("--nope=1", "unknown setting 'nope'"), ("--K=eight", "--K must be a int"), ("--K=0", "--K=0"),
    ("--temperature=-1", "--temperature=-1.0"), ("--ema_rate=1.5", "--ema_rate=1.5"),
    ("--smoke=maybe", "--smoke must be a bool"), ("--method=grpo", "--method='grpo'"), ("K=3", "--key=value"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, arg, words):
    r = _run(arg, f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    r = _run(f"--out_dir={f}", "--smoke=True")
    assert r.returncode == 2 and "is a file" in r.stderr and f.read_text() == "x"

def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = _run("--smoke=True", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"config", "seconds", "models"}
    assert res["config"]["smoke"] is True and res["config"]["K"] == 4
    assert set(res["seconds"]) >= {"base", "opd", "caopd", "eval", "total"}
    assert set(res["models"]) == {"base", "opd", "caopd"}
    keys = {"accuracy", "mean_confidence", "ece", "brier", "ocg", "spr", "auroc", "n", "format_rate"}
    for m in res["models"].values():
        assert set(m) == keys and m["n"] == 64
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 64 and {"model", "completion", "correct", "confidence"} <= set(json.loads(lines[0]))
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "opd   step" in r.stdout and "caopd step" in r.stdout
    # the base model is cached: a second run reuses it
    r2 = _run("--smoke=True", f"--out_dir={out}", "--method=caopd")
    assert r2.returncode == 0 and "reusing base model" in r2.stdout
    assert set(json.loads((out / "results.json").read_text())["models"]) == {"base", "caopd"}
