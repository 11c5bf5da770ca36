"""The Triton kernels of ``triton_decode`` (importing this module imports triton). Each accumulates in fp32 and
rounds once, to its output's dtype. Row blocks of ``ROWS`` rows (``tl.dot``'s smallest), rows past the batch masked."""

import triton
import triton.language as tl

next_power_of_2 = triton.next_power_of_2
ROWS = tl.constexpr(16)  # rows of the batch per program: tl.dot's smallest block (triton_decode.ROWS)


@triton.jit
def rstd(x_ptr, rows, row_ok, C, eps, BLOCK_K: tl.constexpr):
    """1 / RMS of each row of x (B, C) -> (ROWS,) fp32."""
    ss = tl.zeros_like(rows).to(tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * C + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < C), other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(ss / C + eps)


@triton.jit
def normed(x_ptr, nw_ptr, w_ptr, rows, row_ok, ks, k_ok, C, r):
    """Columns ``ks`` of rms_norm(x, nw) (rows' 1 / RMS ``r``), in the weights' (``w_ptr``) dtype: (ROWS, BLOCK_K)."""
    x = tl.load(x_ptr + rows[:, None] * C + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * r[:, None] * nw[None, :]).to(w_ptr.dtype.element_ty)


@triton.jit
def qkv(x_ptr, nw_ptr, w_ptr, b_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, slot_ptr, off_ptr, q_ptr, k_ptr, v_ptr,
        B, C, S, T, eps, SCALE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
        HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, head of q|k|v): norm1(x) @ w[head's D rows]^T, then for q and k QK-norm and RoPE
    (position slot - offset, clamped to the table's T rows), q times the attention's ``SCALE`` into q (B, H, D),
    k and v into the cache (B, HKV, S, D) at the slot. Both norms take ``eps``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    head = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    r = rstd(x_ptr, rows, row_ok, C, eps, BLOCK_K)
    acc1 = tl.zeros((ROWS, HALF), tl.float32)  # the head's first half of features
    acc2 = tl.zeros((ROWS, HALF), tl.float32)  # ... and its second (RoPE pairs feature i with i + D/2)
    n1 = head * D + d
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        xn = normed(x_ptr, nw_ptr, w_ptr, rows, row_ok, ks, k_ok, C, r)
        w1 = tl.load(w_ptr + n1[None, :] * C + ks[:, None], mask=k_ok[:, None], other=0.0)  # (BLOCK_K, HALF)
        w2 = tl.load(w_ptr + (n1 + HALF)[None, :] * C + ks[:, None], mask=k_ok[:, None], other=0.0)
        acc1 += tl.dot(xn, w1)
        acc2 += tl.dot(xn, w2)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + n1).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + n1 + HALF).to(tl.float32)[None, :]
    slot = tl.load(slot_ptr)
    if head < H + HKV:  # a query or key head: QK-norm, RoPE
        if QK_NORM:
            rq = 1.0 / tl.sqrt((tl.sum(acc1 * acc1, axis=1) + tl.sum(acc2 * acc2, axis=1)) / D + eps)
            is_q = head < H
            w1n = tl.where(is_q, tl.load(qn_ptr + d), tl.load(kn_ptr + d)).to(tl.float32)
            w2n = tl.where(is_q, tl.load(qn_ptr + d + HALF), tl.load(kn_ptr + d + HALF)).to(tl.float32)
            acc1 = acc1 * rq[:, None] * w1n[None, :]
            acc2 = acc2 * rq[:, None] * w2n[None, :]
        pos = slot - tl.load(off_ptr + rows, mask=row_ok, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), T - 1)
        c1 = tl.load(cos_ptr + pos[:, None] * D + d[None, :])
        c2 = tl.load(cos_ptr + pos[:, None] * D + d[None, :] + HALF)
        s1 = tl.load(sin_ptr + pos[:, None] * D + d[None, :])
        s2 = tl.load(sin_ptr + pos[:, None] * D + d[None, :] + HALF)
        o1 = acc1 * c1 - acc2 * s1
        o2 = acc2 * c2 + acc1 * s2
        if head < H:
            dst = q_ptr + rows[:, None] * (H * D) + head * D + d[None, :]
            tl.store(dst, (o1 * SCALE).to(q_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(dst + HALF, (o2 * SCALE).to(q_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            dst = k_ptr + rows[:, None] * (HKV * S * D) + (head - H) * (S * D) + slot * D + d[None, :]
            tl.store(dst, o1.to(k_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(dst + HALF, o2.to(k_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        dst = v_ptr + rows[:, None] * (HKV * S * D) + (head - H - HKV) * (S * D) + slot * D + d[None, :]
        tl.store(dst, acc1.to(v_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(dst + HALF, acc2.to(v_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attend(q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, m_ptr, den_ptr, acc_ptr, S, NS, H: tl.constexpr,
           HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (row, query head, block j of BLOCK_S slots): one block's share of softmax(q . keys) @ values over the
    slots up to the step's that ``valid`` (B, S) marks; q already scaled. -> the block's max score m, the sum of
    exp(score - m) and the sum of exp(score - m) * value, each (B, H, NS[, D]) (``combine`` merges them). Blocks
    past the step's slot do nothing (``combine`` skips them)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    slot = tl.load(slot_ptr)
    if j * BLOCK_S <= slot:
        hk = h // (H // HKV)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * (H * D) + h * D + d).to(tl.float32)
        base = b * (HKV * S * D) + hk * (S * D)
        s = j * BLOCK_S + tl.arange(0, BLOCK_S)
        live = s <= slot
        seen = live & (tl.load(valid_ptr + b * S + s, mask=live, other=0) != 0)
        keys = tl.load(k_ptr + base + s[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        vals = tl.load(v_ptr + base + s[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        score = tl.where(seen, tl.sum(keys.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m = tl.max(score, axis=0)
        p = tl.exp(score - tl.where(m == float("-inf"), 0.0, m))  # every slot hidden: p = 0
        out = (b * H + h) * NS + j
        tl.store(m_ptr + out, m)
        tl.store(den_ptr + out, tl.sum(p, axis=0))
        tl.store(acc_ptr + out * D + d, tl.sum(p[:, None] * vals.to(tl.float32), axis=0))


@triton.jit
def combine(m_ptr, den_ptr, acc_ptr, slot_ptr, y_ptr, NS, H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
            NSP: tl.constexpr):
    """Program (row, query head): the blocks of ``attend`` up to the step's slot merged -> y (B, H * D)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr)
    j = tl.arange(0, NSP)
    ok = (j < NS) & (j * BLOCK_S <= slot)
    base = (b * H + h) * NS
    m = tl.load(m_ptr + base + j, mask=ok, other=float("-inf"))
    top = tl.max(m, axis=0)  # finite: the step's own slot is always seen
    w = tl.where(ok, tl.exp(m - top), 0.0)
    den = tl.sum(w * tl.load(den_ptr + base + j, mask=ok, other=0.0), axis=0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (base + j)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    y = tl.sum(w[:, None] * acc, axis=0) / den
    tl.store(y_ptr + b * (H * D) + h * D + d, y.to(y_ptr.dtype.element_ty))


@triton.jit
def add_linear(y_ptr, w_ptr, b_ptr, x_ptr, B, K, N, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x (B, N) += y (B, K) @ w (N, K)^T (+ b), in place, accumulated in fp32 with x's old value."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        y = tl.load(y_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :] * K + ks[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(y.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dst = x_ptr + rows[:, None] * N + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    x = tl.load(dst, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst, (x + acc).to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def norm_linear(x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, B, C, N, eps, SWIGLU: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (B, N) = rms_norm(x, nw) (B, C) @ w^T (+ b); with ``SWIGLU``, w (2N, C) holds the gate's rows then
    the up projection's, and out = silu(gate) * up."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    r = rstd(x_ptr, rows, row_ok, C, eps, BLOCK_K)
    acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    up = tl.zeros((ROWS, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        xn = normed(x_ptr, nw_ptr, w_ptr, rows, row_ok, ks, k_ok, C, r)
        ok = k_ok[:, None] & n_ok[None, :]
        acc += tl.dot(xn, tl.load(w_ptr + n[None, :] * C + ks[:, None], mask=ok, other=0.0))
        if SWIGLU:
            up += tl.dot(xn, tl.load(w_ptr + (n + N)[None, :] * C + ks[:, None], mask=ok, other=0.0))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            up += tl.load(b_ptr + N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    tl.store(out_ptr + rows[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def pack(x, v, V):
    """fp32 values ``x`` at tokens ``v`` as int64 keys in the same order, ties broken towards the lower token: the
    value's bits, made order-preserving, high; V - 1 - v low (``unpack`` inverts it)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (V - 1 - v).to(tl.int64)


@triton.jit
def unpack(key, V):
    """``pack``'s keys -> (the fp32 values, the tokens)."""
    high = (key >> 32).to(tl.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), V - 1 - (key & 0x7FFFFFFF).to(tl.int32)  # the low part < 2**31


@triton.jit
def candidates(logits_ptr, seen_ptr, cand_ptr, V, penalty, temperature, HAS_SEEN: tl.constexpr,
               BLOCK: tl.constexpr, KP: tl.constexpr):
    """Program (row, block of the vocabulary): the CTRL repetition penalty on the seen tokens' logits (divided when
    positive, multiplied when negative), divided by the temperature, in fp32; then the block's ``KP`` largest as
    ``pack``'s keys, descending -> cand (B, blocks * KP)."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    v = blk * BLOCK + tl.arange(0, BLOCK)
    ok = v < V
    x = tl.load(logits_ptr + b * V + v, mask=ok, other=0.0).to(tl.float32)
    if HAS_SEEN:
        s = tl.load(seen_ptr + b * V + v, mask=ok, other=0) != 0
        x = tl.where(s, tl.where(x > 0, x / penalty, x * penalty), x)
    lowest = tl.full([BLOCK], 1, tl.int64) << 63  # below every value's key: the block's padding
    key = tl.where(ok, pack(x / temperature, v, V), lowest)
    j = tl.arange(0, KP)
    tl.store(cand_ptr + (b * tl.num_programs(1) + blk) * KP + j, tl.topk(key, KP))


@triton.jit(do_not_specialize=["record", "has_stop", "mark_seen"])  # one build for the one-step and chunk paths
def pick(cand_ptr, noise_ptr, token_ptr, unsure_ptr, V, N, NC, top_k, top_p, out_ptr, i_ptr, done_ptr, seen_ptr,
         stop_id, pad, K, record, has_stop, mark_seen, TOP_P: tl.constexpr, KP: tl.constexpr, NCP: tl.constexpr):
    """Program (row): the row's N largest logits from its NC candidates (``candidates``' keys; N <= KP), descending,
    ties in token order; top-k (every logit >= the k-th), then top-p (the smallest prefix reaching ``top_p``; the
    first always kept), then the token drawn as ``torch.multinomial`` draws it, argmax of p / Exp(1) noise
    (``noise`` (B, V)) -> token (B,). ``unsure`` (B,) is set where every candidate past the k-th ties with it
    (more may lie outside them). ``record`` (a ``StepChunk``'s step ``i``, ``i_ptr``): the token also into
    out (B, K) at column i, ``pad`` where the row had ended (``done`` (B,)); with ``has_stop`` the row ends at
    ``stop_id``; with ``mark_seen`` the token marked in ``seen`` (B, V). (Flags, not constexprs: the kernel
    compiles once, a second or two for its sorting network.)"""
    b = tl.program_id(0)
    c = tl.arange(0, NCP)
    lowest = tl.full([NCP], 1, tl.int64) << 63
    keys = tl.load(cand_ptr + b * NC + c, mask=c < NC, other=0)
    vals, idx = unpack(tl.topk(tl.where(c < NC, keys, lowest), KP), V)
    j = tl.arange(0, KP)
    ok = j < N
    vals = tl.where(ok, vals, float("-inf"))
    kth = tl.max(tl.where(j == top_k - 1, vals, float("-inf")), axis=0)
    in_k = ok & (vals >= kth)
    e = tl.where(in_k, tl.exp(vals - tl.max(vals, axis=0)), 0.0)
    probs = e / tl.sum(e, axis=0)
    keep = in_k
    if TOP_P:
        keep = in_k & ((tl.cumsum(probs, axis=0) - probs) < top_p)
    noise = tl.load(noise_ptr + b * V + idx, mask=keep, other=1.0)
    score = tl.where(keep, probs / noise, -1.0)
    best = tl.argmax(score, axis=0)
    token = tl.sum(tl.where(j == best, idx, 0), axis=0).to(tl.int64)
    tl.store(token_ptr + b, token)
    if record != 0:
        ended = tl.load(done_ptr + b) != 0
        tl.store(out_ptr + b * K + tl.load(i_ptr), tl.where(ended, pad, token))
        if has_stop != 0:
            tl.store(done_ptr + b, (ended | (token == stop_id)).to(tl.uint8))
        if mark_seen != 0:
            tl.store(seen_ptr + b * V + token, 1)
    last = tl.max(tl.where(j == N - 1, vals, float("-inf")), axis=0)
    if (N < V) & (last >= kth):
        tl.store(unsure_ptr + b, 1)
