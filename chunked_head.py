"""
The LM head's log-probs, divergences and entropies, chunk by chunk, with a hand-written gradient:
the same values as sgpo.py's plain formulas (`--chunked_head false`: full logits, `per_token_kl`),
in memory O(chunk x vocab) instead of O(tokens x vocab).

The loss needs full-vocabulary log-probs at every response position: [M, V] fp32 is 0.6 MB a token
at Qwen's V = 151,936. ChunkedHead applies the head to chunk_size positions at a time and saves only
the [M, H] hidden states; backward recomputes a chunk's logits and writes the gradient with respect
to them analytically (s = logits / T; a, b: the upstream gradients of D_t and log p_s(y)):
    d log p_s(y) / ds = onehot(y) - p_s        d KL(p_t || p_s) / ds = p_s - p_t
    d KL(p_s || p_t) / ds = p_s * (log p_s - log p_t - KL(p_s || p_t))
so that no more than ~3 [chunk, V] fp32 tensors live at once, forward or backward (autograd through
a checkpointed chunk held ~7: tests/bench_kd_memory.py). Matmuls run in the autocast dtype,
softmaxes and sums in fp32.
"""
import torch


def _chunk_log_softmax(hidden, weight, temperature):
    return (hidden @ weight.T).float().div_(temperature).log_softmax(-1)  # [c, V]


def _rowdot(x, y):
    """[c, V] x2 -> [c]: sum_v x * y, without a [c, V] product."""
    return torch.einsum("cv,cv->c", x, y)


def _chunk_forward(h, t_h, y, weights, temperature, kind):
    """One chunk: [c] log p_s(y), D_t, entropy. weights: the student's and the teacher's head. A
    function so that its [c, V] tensors die when it returns."""
    w, t_w = weights
    log_s = _chunk_log_softmax(h, w, temperature)
    logp = log_s.gather(-1, y[:, None]).squeeze(-1)
    entropy = -_rowdot(log_s.exp(), log_s)
    if kind not in ("fkl", "rkl"):
        return logp, torch.zeros_like(logp), entropy
    log_t = _chunk_log_softmax(t_h, t_w, temperature)
    log_p, log_q = (log_t, log_s) if kind == "fkl" else (log_s, log_t)
    p = log_p.exp()
    # KL(p || q) = sum p log p - sum p log q
    return logp, _rowdot(p, log_p) - _rowdot(p, log_q), entropy


def _chunk_backward(chunk, weights, ctx, upstream, g_weight):
    """One chunk: adds d loss / d weight to g_weight, returns d loss / d h. chunk: h, t_h, y, D_t;
    weights: the student's and the teacher's head; upstream: a, b [c, 1]."""
    h, t_h, y, div = chunk
    w, t_w = weights
    a, b = upstream
    temperature, kind, _ = ctx.args
    log_s = _chunk_log_softmax(h, w, temperature)
    if kind == "fkl":
        # (a - b) p_s - a p_t + b onehot(y)
        p_t = _chunk_log_softmax(t_h, t_w, temperature).exp_()
        grad = log_s.exp_().mul_(a - b).sub_(p_t.mul_(a))
    elif kind == "rkl":
        # p_s (a (log p_s - log p_t - D) - b) + b onehot(y)
        x = _chunk_log_softmax(t_h, t_w, temperature).neg_().add_(log_s)  # log p_s - log p_t
        x = x.sub_(div[:, None]).mul_(a).sub_(b)
        grad = log_s.exp_().mul_(x)
    else:
        # log-prob only: b (onehot(y) - p_s)
        grad = log_s.exp_().mul_(-b)
    grad[torch.arange(len(y)), y] += b.squeeze(-1)
    grad = grad.div_(temperature).to(w.dtype)  # [c, V]: d loss / d logits
    g_weight += grad.T @ h
    return grad @ w


def _cast(weight, t_weight, dtype):
    """The student's and the teacher's head weights in the compute dtype; one cast when the teacher
    has no head of its own (t_weight None): at V x H, a copy is 1 GB at 7B."""
    w = weight.to(dtype)
    return w, w if t_weight is None else t_weight.to(dtype)


class ChunkedHead(torch.autograd.Function):
    """The LM head's per-token log-probs, divergences and entropies, chunk_size positions at a time
    (see above)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, targets, temperature, kind, chunk_size):
        """[M, H] hidden, [V, H] head weight, teacher: ([M, H] teacher hidden, [V, H] its head
        weight or None: the student's) or None unless kind is fkl/rkl, [M] targets -> [M] log
        p_s(target), [M] divergence D_t (0 unless fkl/rkl), [M] entropy of p_s (no gradient)."""
        dev = hidden.device.type
        autocast = torch.is_autocast_enabled(dev)
        ctx.dtype = torch.get_autocast_dtype(dev) if autocast else hidden.dtype
        ctx.args = temperature, kind, chunk_size
        t_hidden, t_weight = teacher or (hidden, None)
        weights = _cast(weight, t_weight, ctx.dtype)
        outs = []
        with torch.autocast(dev, enabled=False):
            for i in range(0, len(targets), chunk_size):
                c = slice(i, i + chunk_size)
                h, t_h = hidden[c].to(ctx.dtype), t_hidden[c].to(ctx.dtype)
                outs.append(_chunk_forward(h, t_h, targets[c], weights, temperature, kind))
        logp, div, entropy = (torch.cat(o) for o in zip(*outs))
        ctx.save_for_backward(hidden, weight, t_hidden, t_weight, targets, div)
        ctx.mark_non_differentiable(entropy)
        return logp, div, entropy

    @staticmethod
    def backward(ctx, g_logp, g_div, _):
        hidden, weight, t_hidden, t_weight, targets, div = ctx.saved_tensors
        chunk_size = ctx.args[2]
        weights = _cast(weight, t_weight, ctx.dtype)
        # summed over the chunks in fp32, rounded once: under FSDP the weight is the gathered bf16
        # parameter, and 64 chunks added up in bf16 lose ~4x more than one rounding
        g_weight = torch.zeros_like(weight, dtype=torch.float32)
        g_hidden = []
        for i in range(0, len(targets), chunk_size):
            c = slice(i, i + chunk_size)
            chunk = hidden[c].to(ctx.dtype), t_hidden[c].to(ctx.dtype), targets[c], div[c]
            upstream = g_div[c, None].float(), g_logp[c, None].float()
            g_hidden.append(_chunk_backward(chunk, weights, ctx, upstream, g_weight))
        g_hidden = torch.cat(g_hidden)
        g_weight = g_weight.to(weight.dtype)
        return g_hidden.to(hidden.dtype), g_weight, None, None, None, None, None


def head_weight(head):
    """The LM head's weight; ChunkedHead applies the weight only (no bias in Qwen, Llama, ...)."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported")
    return head.weight


def token_logps(hidden, targets, head, temperature, chunk_size=256):
    """[M, H] hidden states predicting [M] tokens -> ([M] log-probs, [M] entropies),
    temperature-scaled, fp32."""
    logp, _, entropy = ChunkedHead.apply(hidden, head_weight(head), None, targets, temperature,
                                         "logp", chunk_size)
    return logp, entropy


def kd_divergence(s_hidden, t_hidden, targets, head, temperature, kind="fkl", chunk_size=256):
    """[M, H] student and teacher hidden states on the same target tokens -> ([M] D_t, [M] student
    log-probs)."""
    logp, div, _ = ChunkedHead.apply(s_hidden, head_weight(head), (t_hidden.detach(), None),
                                     targets, temperature, kind, chunk_size)
    return div, logp
