"""Loss math against hand-computed values and brute-force references (no model)."""

import math

import pytest
import torch

import chunked_head
import sgpo


def test_grpo_advantages_hand_values():
    adv = sgpo.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = 0.5 / (std + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([expected, -expected, -expected, expected]))
    assert torch.equal(adv[1], torch.zeros(4))  # zero-variance group: no signal


def test_grpo_advantages_matches_loop():
    r = torch.rand(5, 7)
    adv = sgpo.grpo_advantages(r)
    for i in range(5):
        row = r[i].tolist()
        m = sum(row) / 7
        s = math.sqrt(sum((x - m) ** 2 for x in row) / 6)
        for j in range(7):
            assert abs(adv[i, j].item() - (row[j] - m) / (s + 1e-4)) < 1e-5


def test_clipped_surrogate_both_sides():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    logp = torch.log(ratio).requires_grad_()
    loss, clipped = sgpo.grpo_token_loss(logp, torch.zeros(5), adv, 0.2, 0.28)
    # min(rho A, clip(rho) A): 1.5*1 -> clipped at 1.28; 1.5*-1 -> -1.5; 0.5*-1 -> clipped at -0.8;
    # 0.5*1 -> 0.5; 1.1*2
    assert torch.allclose(loss, torch.tensor([-1.28, 1.5, 0.8, -0.5, -2.2]))
    assert clipped.tolist() == [True, False, True, False, False]
    loss.sum().backward()
    # d(-rho A)/d logp = -rho A where the unclipped term is active, 0 where the clip is active
    assert torch.allclose(logp.grad, torch.tensor([0.0, 1.5, 0.0, -0.5, -2.2]))


def test_forward_kl_identical_is_zero():
    logits = torch.randn(3, 4, 11)
    assert torch.allclose(sgpo.per_token_kl(logits, logits.clone()), torch.zeros(3, 4), atol=1e-6)


def test_forward_and_reverse_kl_brute_force():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = t.softmax(-1), s.softmax(-1)  # teacher, student
    for b in range(2):
        for i in range(3):
            fkl = sum(p[b, i, v] * math.log(p[b, i, v] / q[b, i, v]) for v in range(7))
            rkl = sum(q[b, i, v] * math.log(q[b, i, v] / p[b, i, v]) for v in range(7))
            assert abs(sgpo.per_token_kl(s, t, "fkl")[b, i].item() - fkl) < 1e-5
            assert abs(sgpo.per_token_kl(s, t, "rkl")[b, i].item() - rkl) < 1e-5
    with pytest.raises(ValueError):
        sgpo.per_token_kl(s, t, "jsd")


def test_forward_kl_gradient_is_softmax_minus_teacher():
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9, requires_grad=True)
    sgpo.per_token_kl(s, t).sum().backward()
    assert torch.allclose(s.grad, s.softmax(-1) - t.softmax(-1), atol=1e-6)
    assert t.grad is None  # stop-gradient on the teacher


def test_kl_clipping():
    div = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    logp = torch.zeros(3)
    loss, kl_clipped, _ = sgpo.kd_token_loss(
        div, logp, logp, "fkl", kl_clip=1.0, trust_region=False
    )
    assert torch.allclose(loss, torch.tensor([0.5, 1.0, 1.0]))  # min(D, delta)
    assert kl_clipped.tolist() == [False, True, False]
    loss.sum().backward()
    assert div.grad.tolist()[:2] == [1.0, 0.0]  # the token over the threshold gives no gradient
    loss_off, _, _ = sgpo.kd_token_loss(
        div, logp, logp, "fkl", kl_clip=math.inf, trust_region=False
    )
    assert torch.allclose(loss_off, div)


def test_ratio_trust_region():
    div = torch.tensor([0.3, 0.3, 0.3, 0.3], requires_grad=True)
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.0, 0.7, 1.3, 1.25]))  # 0.7 < 0.8 and 1.3 > 1.28 are outside
    loss, _, out = sgpo.kd_token_loss(div, logp, old, "fkl", 1.0, True, 0.2, 0.28)
    assert out.tolist() == [False, True, True, False]
    loss.sum().backward()
    assert div.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(loss, div.detach())  # the value is unchanged, only the gradient is cut
    div.grad = None
    loss, _, _ = sgpo.kd_token_loss(div, logp, old, "fkl", 1.0, False, 0.2, 0.28)
    loss.sum().backward()
    assert div.grad.tolist() == [1.0] * 4


def test_sft_variant_is_nll():
    logp = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()
    loss, kl_clipped, _ = sgpo.kd_token_loss(torch.zeros(2), logp, logp.detach(), "sft", 1.0, True)
    assert torch.allclose(loss, torch.tensor([math.log(2), math.log(4)]))
    assert not kl_clipped.any()
    loss.sum().backward()
    assert logp.grad.tolist() == [-1.0, -1.0]


def test_target_selection():
    correct = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # the incorrect ones are the most likely: ignored
    mean_logp = torch.tensor([-0.1, -2.0, -1.0, -0.05])
    assert sgpo.select_target(correct, mean_logp) == 2
    assert sgpo.select_target(torch.zeros(4), mean_logp) == -1
    picks = {
        sgpo.select_target(correct, mean_logp, False, torch.Generator().manual_seed(s))
        for s in range(30)
    }
    assert picks == {1, 2}  # without selection: any correct rollout, never an incorrect one


def test_update_alpha():
    assert sgpo.update_alpha(0.5, 0.75, 0.25) == pytest.approx(0.6)  # guided better: strengthen
    assert sgpo.update_alpha(0.75, 1.0, 0.0) == pytest.approx(0.8)  # capped at alpha_max
    assert sgpo.update_alpha(0.5, 0.5, 0.5) == pytest.approx(0.4)  # no gap: fade
    assert sgpo.update_alpha(0.05, 0.0, 0.5) == 0.0  # floor 0
    t = sgpo.update_alpha(
        torch.tensor([0.5, 0.75, 0.5, 0.05]), torch.tensor([0.75, 1.0, 0.5, 0.0]),
        torch.tensor([0.25, 0.0, 0.5, 0.5])
    )
    assert torch.allclose(t, torch.tensor([0.6, 0.8, 0.4, 0.0]))


def test_k3_kl():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    assert torch.allclose(sgpo.k3_kl(logp, ref), torch.tensor([0.0, math.e - 1 - 1]))


def test_chunked_kd_equals_plain_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    s_h = torch.randn(10, 8, requires_grad=True)
    t_h = torch.randn(10, 8)
    targets = torch.randint(13, (10,))
    for kind in ("fkl", "rkl", "sft"):
        div, logp = chunked_head.kd_divergence(s_h, t_h, targets, head, 0.7, kind, chunk_size=3)
        (logp if kind == "sft" else div).sum().backward()  # the term that carries the gradient
        g_h, g_w = s_h.grad.clone(), head.weight.grad.clone()
        s_h.grad = head.weight.grad = None
        s_logits, t_logits = head(s_h) / 0.7, head(t_h) / 0.7
        div_ref = sgpo.per_token_kl(s_logits, t_logits, kind) if kind != "sft" else torch.zeros(10)
        logp_ref = s_logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        (logp_ref if kind == "sft" else div_ref).sum().backward()
        assert torch.allclose(div, div_ref, atol=1e-6) and torch.allclose(logp, logp_ref, atol=1e-6)
        assert torch.allclose(g_h, s_h.grad, atol=1e-6) and torch.allclose(
            g_w, head.weight.grad, atol=1e-6
        )
        s_h.grad = head.weight.grad = None


def test_chunked_kd_memory_is_flat_in_length():
    """Extra peak memory of the KD loss (forward + backward) must not grow with the number of
    positions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).with_name("bench_kd_memory.py")
    # freed tensors go back to the OS: RSS = live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peak = {}
    for T in (1024, 4096):
        out = subprocess.run(
            [sys.executable, str(bench), "chunked", str(T), "20000", "512"], capture_output=True,
            text=True, env=env
        )
        peak[T] = float(out.stdout.split()[3])  # mode, positions, chunk, GiB, seconds
    unit = 512 * 20000 * 4 / 2**30  # one [chunk, V] fp32 tensor: 0.038 GiB
    # a tensor retained per chunk would add 6 units at 4096 positions
    assert peak[4096] < peak[1024] + unit / 2, peak
    # ~3 live at once (autograd through a checkpointed chunk held ~7)
    assert peak[4096] < 4 * unit + 0.03, peak


def test_chunked_logps_equal_plain():
    head = torch.nn.Linear(8, 13, bias=False)
    h = torch.randn(7, 8, requires_grad=True)
    targets = torch.randint(13, (7,))
    logp, ent = chunked_head.token_logps(h, targets, head, 2.0, chunk_size=2)
    logp.sum().backward()
    ref_all = (head(h) / 2.0).log_softmax(-1)
    assert torch.allclose(logp, ref_all.gather(-1, targets[:, None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent, -(ref_all.exp() * ref_all).sum(-1), atol=1e-6)
    g = h.grad.clone()
    h.grad = None
    ref_all.gather(-1, targets[:, None]).sum().backward()
    assert torch.allclose(g, h.grad, atol=1e-6)


@pytest.mark.parametrize("own_teacher_head", [False, True], ids=["live", "teacher head"])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "sft", "logp"])
def test_chunked_head_hand_written_gradient_equals_autograd(kind, own_teacher_head):
    """ChunkedHead's analytic backward == autograd through the plain full-logit computation, with
    random upstream gradients on BOTH outputs (D_t and log p_s(y)), any chunk size (1, 3, all), and
    a temperature; the teacher's logits from the student's head (live) or from a head of its own
    (--teacher base/ema), which gets no gradient."""
    torch.manual_seed(1)
    M, H, V, T = 10, 8, 13, 0.7
    head = torch.nn.Linear(H, V, bias=False)
    t_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False) if own_teacher_head else head
    s_h, t_h, targets = (
        torch.randn(M, H, requires_grad=True), torch.randn(M, H), torch.randint(V, (M,))
    )
    a, b = torch.randn(M), torch.randn(M)  # d loss / d D_t, d loss / d log p_s(y)
    s_logits, t_logits = head(s_h) / T, t_head(t_h) / T
    div_ref = (
        sgpo.per_token_kl(s_logits, t_logits, kind) if kind in ("fkl", "rkl") else torch.zeros(M)
    )
    log_s = s_logits.log_softmax(-1)
    logp_ref, ent_ref = (
        log_s.gather(-1, targets[:, None]).squeeze(-1), -(log_s.exp() * log_s).sum(-1)
    )
    (a * div_ref + b * logp_ref).sum().backward()
    g_ref = s_h.grad.clone(), head.weight.grad.clone()
    for chunk in (1, 3, M):
        s_h.grad = head.weight.grad = None
        teacher = (t_h, t_head.weight if own_teacher_head else None)
        logp, div, ent = chunked_head.ChunkedHead.apply(
            s_h, head.weight, teacher, targets, T, kind, chunk
        )
        (a * div + b * logp).sum().backward()
        for x, ref in (
            (logp, logp_ref), (div, div_ref), (ent, ent_ref), (s_h.grad, g_ref[0]),
            (head.weight.grad, g_ref[1])
        ):
            assert torch.allclose(x, ref, atol=1e-5), (chunk, (x - ref).abs().max())
        assert not ent.requires_grad


def test_chunked_head_under_bf16_autocast_matches_autograd():
    """Under bf16 autocast the head's matmuls run in bf16 (as nn.Linear's would) and softmaxes in
    fp32: the values and gradients match autograd through autocast's own linear to bf16 precision,
    and the weight gradient is fp32."""
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=False)
    s_h, t_h, targets = (
        torch.randn(12, 16, requires_grad=True), torch.randn(12, 16), torch.randint(50, (12,))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        div, logp = chunked_head.kd_divergence(s_h, t_h, targets, head, 1.0, "fkl", chunk_size=5)
        div_ref = sgpo.per_token_kl(head(s_h), head(t_h))
    assert div.dtype == logp.dtype == torch.float32
    div.sum().backward()
    g = s_h.grad.clone(), head.weight.grad.clone()
    assert g[1].dtype == torch.float32
    s_h.grad = head.weight.grad = None
    div_ref.sum().backward()
    assert torch.allclose(div, div_ref, atol=1e-3)
    for x, ref in zip(g, (s_h.grad, head.weight.grad)):
        assert torch.allclose(x, ref, atol=2e-2, rtol=2e-2), (x - ref).abs().max()


# ChunkedHead applies the weight only: a bias would be silently dropped
def test_head_with_a_bias_is_refused():
    with pytest.raises(ValueError, match="bias"):
        chunked_head.token_logps(
            torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.nn.Linear(4, 5), 1.0
        )
