"""Triton kernels of the (N, C) coefficient math between the row-wise passes, for SN and BCN.

The row passes (:mod:`norm_plugins.ops.triton_kernels`) read and write x; everything between them
works on per-(sample, channel) statistics. In torch that is dozens of tiny ops per layer and
direction, each a kernel launch on a GPU; here it is one to three launches, so a layer's forward or
backward is at most six launches with its passes (:mod:`norm_plugins.ops.triton_norms` launches
them; the torch formulas in :mod:`~norm_plugins.ops.switchable_norm_fn` and
:mod:`~norm_plugins.ops.batch_channel_norm_fn` are the reference):

    batch_sums_kernel        per channel: sum_n L m, sum_n L (v + (m - centre)^2), count  (float64)
    sn_forward_kernel        per sample: LN moments, the mixture M, V, rstd, the output's A and B;
                             program 0 also finishes the BN moments and moves the running statistics
    sn_channel_grad_kernel   per channel: d weight, d bias, the BN moments' gradients, ratio partials
    sn_sample_grad_kernel    per sample: the input gradient's a, P, Q
    sn_ratio_grad_kernel     per group: the mixture tensors' gradients (through the softmax)
    bcn_forward_kernel       per sample: the group normalization of x', the output's A and B;
                             program 0 also moves the running statistics or the estimates
    bcn_sample_grad_kernel   per sample: the group-level sums and the input gradient's a, P, Q
                             for constant statistics
    bcn_channel_grad_kernel  per channel: d weight, d bias, d group weight/bias, and P, Q's batch
                             terms (or their sums for an all-reduce, then bcn_batch_terms_kernel)

Per-sample programs loop over C in tiles of ``BLOCK_C`` channels, per-channel programs over N.
Arithmetic is in float64, as the torch path's (the row means are float64); what the passes take
(their centre, A, B, a, P, Q) is stored in x's accumulation dtype, the centre rounded and B and Q
making up for its rounding.
A value that several programs need but only one may write (running statistics, estimates,
``num_batches_tracked``) is written by program 0 from what it read itself, after no other program
can still read it, so no program sees another's update.
"""
import triton
import triton.language as tl


@triton.jit
def _and(mask, flag):
    """``mask & flag`` for a boolean tile and a boolean scalar (``&`` of the two is not a boolean in
    Triton's interpreter)."""
    return tl.where(flag, mask, False)


@triton.jit
def _column(base, col: tl.constexpr, mask, missing: tl.constexpr, BLOCK: tl.constexpr, ty: tl.constexpr):
    """Column ``col`` of the (G, K) rows at ``base`` (one per channel), or ``missing`` when unused."""
    if col >= 0:
        values = tl.load(base + col, mask=mask, other=0.).to(ty)
    else:
        values = tl.full([BLOCK], missing, ty)
    return values


@triton.jit
def _ratios(mix_ptr, cs, mask, group_size, K: tl.constexpr, COL_IN: tl.constexpr, COL_LN: tl.constexpr,
            COL_BN: tl.constexpr, LOGITS: tl.constexpr, BLOCK: tl.constexpr, ty: tl.constexpr):
    """Per-channel ratios (IN, LN, BN) of channels ``cs`` from the (G, K) mixture tensor, in ``ty``:
    the softmax of each channel group's logits, or the given ratios; 0 for unused normalizers."""
    base = mix_ptr + (cs // group_size) * K
    missing: tl.constexpr = float('-inf') if LOGITS else 0.
    r_in = _column(base, COL_IN, mask, missing, BLOCK, ty)
    r_ln = _column(base, COL_LN, mask, missing, BLOCK, ty)
    r_bn = _column(base, COL_BN, mask, missing, BLOCK, ty)
    if LOGITS:
        top = tl.maximum(tl.maximum(r_in, r_ln), r_bn)
        r_in = tl.exp(r_in - top)
        r_ln = tl.exp(r_ln - top)
        r_bn = tl.exp(r_bn - top)
        total = r_in + r_ln + r_bn
        r_in = r_in / total
        r_ln = r_ln / total
        r_bn = r_bn / total
    return r_in, r_ln, r_bn


@triton.jit
def _unbiased_factor(L, acc_ty: tl.constexpr, UNBIASED: tl.constexpr):
    """k = L / (L - 1) for the authors' unbiased instance variance (1 for L = 1 or biased)."""
    if UNBIASED:
        k = tl.where(L > 1, L.to(acc_ty) / tl.maximum(L - 1, 1).to(acc_ty), 1.)
    else:
        k = tl.full([], 1., acc_ty)
    return k


@triton.jit
def _batch_moments(sums_ptr, cs, mask, C):
    """Per-channel mean and biased variance (float64) from (possibly all-reduced) batch sums."""
    count = tl.maximum(tl.load(sums_ptr + 2 * C), 1.)
    mean = tl.load(sums_ptr + cs, mask=mask, other=0.) / count
    var = tl.maximum(tl.load(sums_ptr + C + cs, mask=mask, other=0.) / count - mean * mean, 0.)
    return mean, var


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula, so the running statistics match the torch path bit for bit in spirit."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def batch_sums_kernel(m_ptr, v_ptr, centre_ptr, spread_ptr, sums_ptr, N, C, L,
                      HAS_CENTRE: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_C: tl.constexpr):
    """``[sum x (C), sum (x - centre)^2 (C), count]`` in float64 from the (N, C) row moments
    (``v`` scaled by k when UNBIASED); summable over ranks. With a centre (micro-batch BCN: the
    previous estimated mean) the centre and ``spread`` (the previous estimated variance) are copied
    behind the sums, where the reduction does not touch them."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    k = _unbiased_factor(L, tl.float64, UNBIASED)
    centre = tl.zeros([BLOCK_C], tl.float64)
    if HAS_CENTRE:
        centre = tl.load(centre_ptr + cs, mask=mask, other=0.).to(tl.float64)
        tl.store(sums_ptr + 2 * C + 1 + cs, centre, mask=mask)
        tl.store(sums_ptr + 3 * C + 1 + cs, tl.load(spread_ptr + cs, mask=mask, other=1.).to(tl.float64),
                 mask=mask)
    s1 = tl.zeros([BLOCK_C], tl.float64)
    s2 = tl.zeros([BLOCK_C], tl.float64)
    for n in range(0, N):
        m = tl.load(m_ptr + n * C + cs, mask=mask, other=0.).to(tl.float64)
        v = tl.load(v_ptr + n * C + cs, mask=mask, other=0.).to(tl.float64) * k
        s1 += m
        s2 += v + (m - centre) * (m - centre)
    length = L.to(tl.float64)
    tl.store(sums_ptr + cs, s1 * length, mask=mask)
    tl.store(sums_ptr + C + cs, s2 * length, mask=mask)
    tl.store(sums_ptr + 2 * C, N.to(tl.float64) * length, mask=tl.program_id(0) == 0)


@triton.jit
def _running_update(rmean_ptr, rvar_ptr, nbt_ptr, cs, mask, mean, var, valid, momentum, momentum_low,
                    CUMULATIVE: tl.constexpr, write):
    """BatchNorm's running-statistics update of channels ``cs`` where ``write`` (program 0) and
    ``valid`` (the batch held elements); ``num_batches_tracked`` is read here, moved by the caller.
    A Python float reaches a kernel as a float32, so the momentum comes as two float32 parts whose
    sum carries float64 buffers' precision."""
    buf_ty = rmean_ptr.dtype.element_ty
    if CUMULATIVE:
        seen = tl.load(nbt_ptr) + valid.to(tl.int64)
        factor = 1. / tl.maximum(seen, 1).to(buf_ty)
    else:
        factor = tl.cast(momentum, buf_ty) + tl.cast(momentum_low, buf_ty)
    rmean = tl.load(rmean_ptr + cs, mask=mask, other=0.)
    rvar = tl.load(rvar_ptr + cs, mask=mask, other=0.)
    keep = _and(_and(mask, write), valid)
    tl.store(rmean_ptr + cs, _lerp(rmean, mean.to(buf_ty), factor), mask=keep)
    tl.store(rvar_ptr + cs, _lerp(rvar, var.to(buf_ty), factor), mask=keep)


@triton.jit
def sn_forward_kernel(mu_ptr, var_ptr, mix_m_ptr, mix_v_ptr, w_ptr, b_ptr, sums_ptr, rmean_ptr,
                      rvar_ptr, nbt_ptr, centre_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, ln_ptr, bn_ptr,
                      N, C, L, group_size, eps, momentum, momentum_low,
                      K: tl.constexpr, COL_IN: tl.constexpr, COL_LN: tl.constexpr, COL_BN: tl.constexpr,
                      LOGITS: tl.constexpr, BN_MODE: tl.constexpr, UPDATE: tl.constexpr,
                      CUMULATIVE: tl.constexpr, AFFINE: tl.constexpr, UNBIASED: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """SN's forward coefficients of one sample: ``M`` (float64, and rounded as the pass's centre),
    ``rstd``, ``A = weight * rstd`` and ``B = bias + (centre - M) A``.

    ``BN_MODE``: 0 no BN statistics, 1 from ``sums`` (this batch; program 0 stores them in ``bn``
    for backward and, with UPDATE, moves the running statistics), 2 the running statistics.
    ``ln`` receives this sample's (mu_ln, var_ln), needed again in backward. The grid has at least
    one program, so an empty batch (of a synchronized rank) still has program 0's duties done.
    """
    acc_ty: tl.constexpr = tl.float64
    centre_ty = centre_ptr.dtype.element_ty
    n = tl.program_id(0)
    row = n.to(tl.int64) * C
    k = _unbiased_factor(L, acc_ty, UNBIASED)
    first = n == 0
    sample = n < N
    mu_ln = 0.
    var_ln = 0.
    if COL_LN >= 0:
        total = tl.zeros([BLOCK_C], acc_ty)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            total += tl.load(mu_ptr + row + cs, mask=_and(cs < C, sample), other=0.)
        mu_ln = tl.sum(total, 0) / C
        total = tl.zeros([BLOCK_C], acc_ty)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            mask = _and(cs < C, sample)
            mu = tl.load(mu_ptr + row + cs, mask=mask, other=0.)
            v = tl.load(var_ptr + row + cs, mask=mask, other=0.).to(acc_ty) * k
            total += tl.where(mask, v + (mu - mu_ln) * (mu - mu_ln), 0.)
        var_ln = tl.sum(total, 0) / C
        tl.store(ln_ptr + 2 * n, mu_ln, mask=sample)
        tl.store(ln_ptr + 2 * n + 1, var_ln, mask=sample)
    valid = False
    if BN_MODE == 1:
        valid = tl.load(sums_ptr + 2 * C) > 0
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = cs < C
        out = _and(mask, sample)
        mu = tl.load(mu_ptr + row + cs, mask=out, other=0.)
        v = tl.load(var_ptr + row + cs, mask=out, other=0.).to(acc_ty) * k
        mu_bn = tl.zeros([BLOCK_C], acc_ty)
        var_bn = tl.zeros([BLOCK_C], acc_ty)
        if BN_MODE == 1:
            batch_mean, batch_var = _batch_moments(sums_ptr, cs, mask, C)
            mu_bn = batch_mean.to(acc_ty)
            var_bn = batch_var.to(acc_ty)
            tl.store(bn_ptr + cs, mu_bn, mask=_and(mask, first))
            tl.store(bn_ptr + C + cs, var_bn, mask=_and(mask, first))
            if UPDATE:
                _running_update(rmean_ptr, rvar_ptr, nbt_ptr, cs, mask, mu_bn, var_bn, valid, momentum, momentum_low,
                                CUMULATIVE, first)
        elif BN_MODE == 2:
            mu_bn = tl.load(rmean_ptr + cs, mask=mask, other=0.).to(acc_ty)
            var_bn = tl.load(rvar_ptr + cs, mask=mask, other=0.).to(acc_ty)
        rm_in, rm_ln, rm_bn = _ratios(mix_m_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        rv_in, rv_ln, rv_bn = _ratios(mix_v_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        mean = rm_in * mu + rm_ln * mu_ln + rm_bn * mu_bn
        var = rv_in * v + rv_ln * var_ln + rv_bn * var_bn
        rstd = 1. / tl.sqrt(var + eps)
        scale = rstd
        centre = mean.to(centre_ty)
        shift = (centre.to(acc_ty) - mean) * scale
        if AFFINE:
            scale = rstd * tl.load(w_ptr + cs, mask=mask, other=0.).to(acc_ty)
            shift = (centre.to(acc_ty) - mean) * scale + tl.load(b_ptr + cs, mask=mask, other=0.).to(acc_ty)
        tl.store(centre_ptr + row + cs, centre, mask=out)
        tl.store(mean_ptr + row + cs, mean, mask=out)
        tl.store(rstd_ptr + row + cs, rstd, mask=out)
        tl.store(scale_ptr + row + cs, scale.to(centre_ty), mask=out)
        tl.store(shift_ptr + row + cs, shift.to(centre_ty), mask=out)
    if UPDATE:
        tl.store(nbt_ptr, tl.load(nbt_ptr) + valid.to(tl.int64), mask=first)


@triton.jit
def _sn_grad_terms(sg_ptr, sgc_ptr, rstd_ptr, w_ptr, centre_ptr, mean_ptr, offsets, cs, mask, AFFINE: tl.constexpr):
    """Per (n, c), in float64: a = weight * rstd, dL/dM = -a Sg and dL/dV = -a rstd^2 Sgc / 2, with
    Sgc = sum g (x - M) from the pass's sum g (x - centre)."""
    rstd = tl.load(rstd_ptr + offsets, mask=mask, other=0.)
    a = rstd
    if AFFINE:
        a = rstd * tl.load(w_ptr + cs, mask=mask, other=0.).to(tl.float64)
    sg = tl.load(sg_ptr + offsets, mask=mask, other=0.).to(tl.float64)
    centre = tl.load(centre_ptr + offsets, mask=mask, other=0.).to(tl.float64)
    sgc = tl.load(sgc_ptr + offsets, mask=mask, other=0.).to(tl.float64) + \
        (centre - tl.load(mean_ptr + offsets, mask=mask, other=0.)) * sg
    return rstd, a, -a * sg, -0.5 * a * rstd * rstd * sgc, sg, sgc


@triton.jit
def _sn_bn_constants(bn_ptr, rmean_ptr, rvar_ptr, cs, mask, C, acc_ty: tl.constexpr,
                     BN_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The BN moments forward used: this batch's (saved), the running ones, or none."""
    if BN_MODE == 1:
        mean = tl.load(bn_ptr + cs, mask=mask, other=0.).to(acc_ty)
        var = tl.load(bn_ptr + C + cs, mask=mask, other=0.).to(acc_ty)
    elif BN_MODE == 2:
        mean = tl.load(rmean_ptr + cs, mask=mask, other=0.).to(acc_ty)
        var = tl.load(rvar_ptr + cs, mask=mask, other=0.).to(acc_ty)
    else:
        mean = tl.zeros([BLOCK_C], acc_ty)
        var = tl.zeros([BLOCK_C], acc_ty)
    return mean, var


@triton.jit
def sn_channel_grad_kernel(sg_ptr, sgc_ptr, mu_ptr, var_ptr, ln_ptr, bn_ptr, rmean_ptr, rvar_ptr, centre_ptr,
                           mean_ptr, rstd_ptr, w_ptr, mix_m_ptr, mix_v_ptr, dw_ptr, db_ptr, dbn_ptr, part_ptr,
                           N, C, L, group_size,
                           K: tl.constexpr, COL_IN: tl.constexpr, COL_LN: tl.constexpr, COL_BN: tl.constexpr,
                           LOGITS: tl.constexpr, BN_MODE: tl.constexpr, AFFINE: tl.constexpr,
                           UNBIASED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums over the samples, per channel: d weight, d bias; ``dbn`` = the gradients of the batch
    moments (float64, summable over ranks; BN_MODE 1); ``part`` (C, 6) = sum_n dM mu_k and
    sum_n dV var_k for k = IN, LN, BN, the per-channel shares of the ratios' gradients."""
    acc_ty: tl.constexpr = tl.float64
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    k = _unbiased_factor(L, acc_ty, UNBIASED)
    mu_bn, var_bn = _sn_bn_constants(bn_ptr, rmean_ptr, rvar_ptr, cs, mask, C, acc_ty, BN_MODE, BLOCK_C)
    d_w = tl.zeros([BLOCK_C], acc_ty)
    d_b = tl.zeros([BLOCK_C], acc_ty)
    sum_dm = tl.zeros([BLOCK_C], acc_ty)
    sum_dv = tl.zeros([BLOCK_C], acc_ty)
    dm_in = tl.zeros([BLOCK_C], acc_ty)
    dm_ln = tl.zeros([BLOCK_C], acc_ty)
    dv_in = tl.zeros([BLOCK_C], acc_ty)
    dv_ln = tl.zeros([BLOCK_C], acc_ty)
    for n in range(0, N):
        offsets = n * C + cs
        rstd, a, dm, dv, sg, sgc = _sn_grad_terms(sg_ptr, sgc_ptr, rstd_ptr, w_ptr, centre_ptr, mean_ptr, offsets, cs,
                                                  mask, AFFINE)
        d_w += sgc * rstd
        d_b += sg
        sum_dm += dm
        sum_dv += dv
        dm_in += dm * tl.load(mu_ptr + offsets, mask=mask, other=0.)
        dv_in += dv * tl.load(var_ptr + offsets, mask=mask, other=0.).to(acc_ty) * k
        if COL_LN >= 0:
            dm_ln += dm * tl.load(ln_ptr + 2 * n)
            dv_ln += dv * tl.load(ln_ptr + 2 * n + 1)
    if AFFINE:
        tl.store(dw_ptr + cs, d_w.to(dw_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + cs, d_b.to(db_ptr.dtype.element_ty), mask=mask)
    if BN_MODE == 1:
        _, _, rm_bn = _ratios(mix_m_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        _, _, rv_bn = _ratios(mix_v_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        tl.store(dbn_ptr + cs, rm_bn * sum_dm, mask=mask)
        tl.store(dbn_ptr + C + cs, rv_bn * sum_dv, mask=mask)
    part = part_ptr + cs * 6
    tl.store(part, dm_in, mask=mask)
    tl.store(part + 1, dm_ln, mask=mask)
    tl.store(part + 2, sum_dm * mu_bn, mask=mask)
    tl.store(part + 3, dv_in, mask=mask)
    tl.store(part + 4, dv_ln, mask=mask)
    tl.store(part + 5, sum_dv * var_bn, mask=mask)


@triton.jit
def sn_sample_grad_kernel(sg_ptr, sgc_ptr, mu_ptr, ln_ptr, bn_ptr, dbn_ptr, sums_ptr, centre_ptr, mean_ptr, rstd_ptr,
                          w_ptr, mix_m_ptr, mix_v_ptr, a_ptr, p_ptr, q_ptr, C, L, group_size,
                          K: tl.constexpr, COL_IN: tl.constexpr, COL_LN: tl.constexpr, COL_BN: tl.constexpr,
                          LOGITS: tl.constexpr, BATCH: tl.constexpr, AFFINE: tl.constexpr,
                          UNBIASED: tl.constexpr, BLOCK_C: tl.constexpr):
    """The input gradient's coefficients of one sample, ``dx = g a + (x - M) P + Q`` (see
    :mod:`norm_plugins.ops.switchable_norm_fn`); BATCH: the BN moments were this batch's, with
    (all-reduced) gradients ``dbn`` over ``count`` elements per channel. The pass is centred on the
    rounded centre, so Q takes ``P (centre - mu_in)`` where the formula has ``P (M - mu_in)``."""
    acc_ty: tl.constexpr = tl.float64
    n = tl.program_id(0)
    row = n.to(tl.int64) * C
    k = _unbiased_factor(L, acc_ty, UNBIASED)
    inv_l = 1. / L.to(acc_ty)
    inv_cl = inv_l / C
    d_var_ln = 0.
    d_mean_ln = 0.
    mu_ln = 0.
    if COL_LN >= 0:
        mu_ln = tl.load(ln_ptr + 2 * n)
        total_v = tl.zeros([BLOCK_C], acc_ty)
        total_m = tl.zeros([BLOCK_C], acc_ty)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            mask = cs < C
            _, _, dm, dv, _, _ = _sn_grad_terms(sg_ptr, sgc_ptr, rstd_ptr, w_ptr, centre_ptr, mean_ptr, row + cs, cs,
                                                mask, AFFINE)
            _, rm_ln, _ = _ratios(mix_m_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
            _, rv_ln, _ = _ratios(mix_v_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
            total_m += rm_ln * dm
            total_v += rv_ln * dv
        d_mean_ln = tl.sum(total_m, 0)
        d_var_ln = tl.sum(total_v, 0)
    count = 1.
    if BATCH:
        count = tl.maximum(tl.load(sums_ptr + 2 * C), 1.)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = cs < C
        _, a, dm, dv, _, _ = _sn_grad_terms(sg_ptr, sgc_ptr, rstd_ptr, w_ptr, centre_ptr, mean_ptr, row + cs, cs,
                                            mask, AFFINE)
        rm_in, _, _ = _ratios(mix_m_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        rv_in, _, _ = _ratios(mix_v_ptr, cs, mask, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, BLOCK_C, acc_ty)
        mu = tl.load(mu_ptr + row + cs, mask=mask, other=0.)
        p = 2 * k * (inv_l * rv_in * dv + inv_cl * d_var_ln)
        q = inv_l * rm_in * dm + inv_cl * (d_mean_ln + 2 * d_var_ln * (mu - mu_ln))
        if BATCH:
            d_mu_bn = (tl.load(dbn_ptr + cs, mask=mask, other=0.) / count).to(acc_ty)
            d_var_bn = (tl.load(dbn_ptr + C + cs, mask=mask, other=0.) / count).to(acc_ty)
            mu_bn = tl.load(bn_ptr + cs, mask=mask, other=0.)
            p += 2 * k * d_var_bn
            q += d_mu_bn + 2 * d_var_bn * (mu - mu_bn)
        q += p * (tl.load(centre_ptr + row + cs, mask=mask, other=0.).to(acc_ty) - mu)
        out_ty = a_ptr.dtype.element_ty
        tl.store(a_ptr + row + cs, a.to(out_ty), mask=mask)
        tl.store(p_ptr + row + cs, p.to(out_ty), mask=mask)
        tl.store(q_ptr + row + cs, q.to(out_ty), mask=mask)


@triton.jit
def _softmax_grad(r_in, r_ln, r_bn, d_in, d_ln, d_bn, LOGITS: tl.constexpr):
    """d logits = r (d r - sum_j r_j d r_j) for softmaxed ratios; given ratios pass through."""
    if LOGITS:
        dot = r_in * d_in + r_ln * d_ln + r_bn * d_bn
        d_in = r_in * (d_in - dot)
        d_ln = r_ln * (d_ln - dot)
        d_bn = r_bn * (d_bn - dot)
    return d_in, d_ln, d_bn


@triton.jit
def _store_columns(base, d_in, d_ln, d_bn, COL_IN: tl.constexpr, COL_LN: tl.constexpr, COL_BN: tl.constexpr):
    if COL_IN >= 0:
        tl.store(base + COL_IN, d_in)
    if COL_LN >= 0:
        tl.store(base + COL_LN, d_ln)
    if COL_BN >= 0:
        tl.store(base + COL_BN, d_bn)


@triton.jit
def sn_ratio_grad_kernel(part_ptr, mix_m_ptr, mix_v_ptr, dmix_m_ptr, dmix_v_ptr, group_size,
                         K: tl.constexpr, COL_IN: tl.constexpr, COL_LN: tl.constexpr, COL_BN: tl.constexpr,
                         LOGITS: tl.constexpr, TIED: tl.constexpr, BLOCK_C: tl.constexpr):
    """One group's mixture gradients: the per-channel partials summed over the group's channels,
    then through the softmax (tied: the mean and variance shares of one vector)."""
    acc_ty = part_ptr.dtype.element_ty
    g = tl.program_id(0)
    totals = tl.zeros([BLOCK_C, 8], acc_ty)
    columns = tl.arange(0, 8)
    for c0 in range(0, group_size, BLOCK_C):
        cs = g * group_size + c0 + tl.arange(0, BLOCK_C)
        mask = (c0 + tl.arange(0, BLOCK_C) < group_size)[:, None] & (columns < 6)[None, :]
        totals += tl.load(part_ptr + cs[:, None] * 6 + columns[None, :], mask=mask, other=0.)
    d = tl.sum(totals, 0)
    # Each as a [1] tensor, like the ratios of the group's first channel below.
    d_m_in = tl.sum(tl.where(columns == 0, d, 0.), 0, keep_dims=True)
    d_m_ln = tl.sum(tl.where(columns == 1, d, 0.), 0, keep_dims=True)
    d_m_bn = tl.sum(tl.where(columns == 2, d, 0.), 0, keep_dims=True)
    d_v_in = tl.sum(tl.where(columns == 3, d, 0.), 0, keep_dims=True)
    d_v_ln = tl.sum(tl.where(columns == 4, d, 0.), 0, keep_dims=True)
    d_v_bn = tl.sum(tl.where(columns == 5, d, 0.), 0, keep_dims=True)
    first = g * group_size + tl.arange(0, 1)
    rm_in, rm_ln, rm_bn = _ratios(mix_m_ptr, first, first >= 0, group_size, K, COL_IN, COL_LN, COL_BN, LOGITS, 1, acc_ty)
    if TIED:
        d_in, d_ln, d_bn = _softmax_grad(rm_in, rm_ln, rm_bn, d_m_in + d_v_in, d_m_ln + d_v_ln,
                                         d_m_bn + d_v_bn, LOGITS)
        _store_columns(dmix_m_ptr + g * K + tl.arange(0, 1), d_in, d_ln, d_bn, COL_IN, COL_LN, COL_BN)
    else:
        rv_in, rv_ln, rv_bn = _ratios(mix_v_ptr, first, first >= 0, group_size, K, COL_IN, COL_LN, COL_BN,
                                      LOGITS, 1, acc_ty)
        d_in, d_ln, d_bn = _softmax_grad(rm_in, rm_ln, rm_bn, d_m_in, d_m_ln, d_m_bn, LOGITS)
        _store_columns(dmix_m_ptr + g * K + tl.arange(0, 1), d_in, d_ln, d_bn, COL_IN, COL_LN, COL_BN)
        d_in, d_ln, d_bn = _softmax_grad(rv_in, rv_ln, rv_bn, d_v_in, d_v_ln, d_v_bn, LOGITS)
        _store_columns(dmix_v_ptr + g * K + tl.arange(0, 1), d_in, d_ln, d_bn, COL_IN, COL_LN, COL_BN)


@triton.jit
def _bcn_channel_stats(sums_ptr, mean_ptr, var_ptr, rate_ptr, cs, mask, C, MODE: tl.constexpr):
    """BCN's per-channel statistics (float64) for channels ``cs``. MODE 1: the batch's, from the
    (all-reduced) sums; 2: the constants at ``mean_ptr``/``var_ptr`` (running statistics or estimates,
    in eval); 3: micro-batch training: Algorithm 1's update of the previous estimates (copied behind
    the sums by :func:`batch_sums_kernel`) toward the batch mean and the mean squared distance from
    the previous estimated mean, at rate r; a batch without elements keeps them."""
    if MODE == 1:
        mean, var = _batch_moments(sums_ptr, cs, mask, C)
    elif MODE == 2:
        mean = tl.load(mean_ptr + cs, mask=mask, other=0.).to(tl.float64)
        var = tl.load(var_ptr + cs, mask=mask, other=1.).to(tl.float64)
    else:
        count = tl.load(sums_ptr + 2 * C)
        total = tl.maximum(count, 1.)
        old_mean = tl.load(sums_ptr + 2 * C + 1 + cs, mask=mask, other=0.)
        old_var = tl.load(sums_ptr + 3 * C + 1 + cs, mask=mask, other=1.)
        rate = tl.load(rate_ptr).to(tl.float64)
        mean = _lerp(old_mean, tl.load(sums_ptr + cs, mask=mask, other=0.) / total, rate)
        var = _lerp(old_var, tl.load(sums_ptr + C + cs, mask=mask, other=0.) / total, rate)
        mean = tl.where(count > 0, mean, old_mean)
        var = tl.where(count > 0, var, old_var)
    return mean, var


@triton.jit
def _bcn_tile(m_ptr, v_ptr, sums_ptr, mean_ptr, var_ptr, rate_ptr, w_ptr, b_ptr, gw_ptr, row, row_ok, j0, C, G,
              eps, MODE: tl.constexpr, AFFINE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """BCN's per-row constants for the groups j0 .. j0 + BLOCK_G of one sample, as
    [BLOCK_G, BLOCK_K] tiles (group, channel within it), in float64 (see
    :mod:`norm_plugins.ops.batch_channel_norm_fn`): a = weight / sqrt(var_c + eps), d = m - mean_c,
    hc (the row mean of x' minus its group mean), s = group_weight / sqrt(var_nk + eps), and
    rstd_g = 1 / sqrt(var_nk + eps) ([BLOCK_G]). The per-channel statistics come as MODE says
    (:func:`_bcn_channel_stats`), each program deriving them itself."""
    per_group = C // G
    js = j0 + tl.arange(0, BLOCK_G)
    ks = tl.arange(0, BLOCK_K)
    cs = js[:, None] * per_group + ks[None, :]
    mask = _and((js < G)[:, None] & (ks < per_group)[None, :], row_ok)
    mean_c, var_c = _bcn_channel_stats(sums_ptr, mean_ptr, var_ptr, rate_ptr, cs, mask, C, MODE)
    rstd_c = 1. / tl.sqrt(var_c + eps)
    m = tl.load(m_ptr + row + cs, mask=mask, other=0.).to(tl.float64)
    v = tl.load(v_ptr + row + cs, mask=mask, other=0.).to(tl.float64)
    a = rstd_c
    if AFFINE:
        a = rstd_c * tl.load(w_ptr + cs, mask=mask, other=0.).to(tl.float64)
    d = tl.where(mask, m - mean_c, 0.)
    h = a * d
    if AFFINE:
        h += tl.load(b_ptr + cs, mask=mask, other=0.).to(tl.float64)
    h = tl.where(mask, h, 0.)
    hc = tl.where(mask, h - (tl.sum(h, 1) / per_group)[:, None], 0.)
    rstd_g = 1. / tl.sqrt(tl.sum(tl.where(mask, a * a * v, 0.) + hc * hc, 1) / per_group + eps)
    s = rstd_g
    if AFFINE:
        s = rstd_g * tl.load(gw_ptr + js, mask=js < G, other=0.).to(tl.float64)
    return cs, mask, js, a, d, hc, v, s, rstd_g, rstd_c


@triton.jit
def bcn_forward_kernel(m_ptr, v_ptr, sums_ptr, mean_ptr, var_ptr, rate_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr,
                       rmean_ptr, rvar_ptr, nbt_ptr, stats_ptr, centre_ptr, scale_ptr, shift_ptr, N, C, G, eps,
                       momentum,
                       momentum_low,
                       MODE: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                       AFFINE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """BCN's forward coefficients of one sample: ``y = (x - centre) A + B`` with ``A = s a``,
    ``B = s hc + group_bias + (centre - m) A``, the centre being the row means ``m`` rounded to
    x's accumulation dtype. Every program derives the per-channel statistics (MODE as in
    :func:`_bcn_channel_stats`) and program 0 records them in ``stats`` (2, C) for backward, then
    moves the running statistics (MODE 1 with UPDATE: the unbiased variance, and only for a batch
    of more than one element per channel) or the estimates (MODE 3). The estimates' previous values
    come from the sums, so no program reads what program 0 writes."""
    n = tl.program_id(0)
    first = n == 0
    sample = n < N
    valid = False
    if MODE == 1:  # a batch variance needs two elements per channel
        valid = tl.load(sums_ptr + 2 * C) > 1.
    elif MODE == 3:
        valid = tl.load(sums_ptr + 2 * C) > 0.
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = cs < C
        mean, var = _bcn_channel_stats(sums_ptr, mean_ptr, var_ptr, rate_ptr, cs, mask, C, MODE)
        tl.store(stats_ptr + cs, mean, mask=_and(mask, first))
        tl.store(stats_ptr + C + cs, var, mask=_and(mask, first))
        if MODE == 3:
            keep = _and(_and(mask, first), valid)
            tl.store(mean_ptr + cs, mean.to(mean_ptr.dtype.element_ty), mask=keep)
            tl.store(var_ptr + cs, var.to(var_ptr.dtype.element_ty), mask=keep)
        if UPDATE:
            count = tl.load(sums_ptr + 2 * C)
            unbiased = var * (count / tl.maximum(count - 1, 1.))
            _running_update(rmean_ptr, rvar_ptr, nbt_ptr, cs, mask, mean, unbiased, valid, momentum, momentum_low,
                            CUMULATIVE, first)
    if UPDATE:
        tl.store(nbt_ptr, tl.load(nbt_ptr) + valid.to(tl.int64), mask=first)
    row = n.to(tl.int64) * C
    for j0 in range(0, G, BLOCK_G):
        cs, mask, js, a, d, hc, v, s, rstd_g, rstd_c = _bcn_tile(
            m_ptr, v_ptr, sums_ptr, mean_ptr, var_ptr, rate_ptr, w_ptr, b_ptr, gw_ptr, row, sample, j0, C, G,
            eps, MODE, AFFINE, BLOCK_G, BLOCK_K)
        out_ty = centre_ptr.dtype.element_ty
        m = tl.load(m_ptr + row + cs, mask=mask, other=0.).to(tl.float64)
        centre = m.to(out_ty)
        scale = s[:, None] * a
        shift = s[:, None] * hc + (centre.to(tl.float64) - m) * scale
        if AFFINE:
            shift += tl.load(gb_ptr + js, mask=js < G, other=0.).to(tl.float64)[:, None]
        tl.store(centre_ptr + row + cs, centre, mask=mask)
        tl.store(scale_ptr + row + cs, scale.to(out_ty), mask=mask)
        tl.store(shift_ptr + row + cs, shift.to(out_ty), mask=mask)


@triton.jit
def bcn_sample_grad_kernel(s1_ptr, s2_ptr, m_ptr, v_ptr, centre_ptr, stats_ptr, w_ptr, b_ptr, gw_ptr, e1_ptr,
                           e2_ptr, grp_ptr, a_ptr, p_ptr, q_ptr, C, G, L, eps,
                           AFFINE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """One sample's share of BCN's backward from the row sums S1 = sum g, S2 = sum g (x - m) (see
    :mod:`norm_plugins.ops.batch_channel_norm_fn`): the gradients E1 = sum dL/dx', E2 = sum
    dL/dx' (x - m) per (n, c) for the per-channel reductions, ``grp`` (N, 2, G) = T rstd_g and the
    group sums of S1 for the group affine, and the input gradient's a, P, Q as they are for
    constant per-channel statistics. The passes are centred on the rounded means: S2 is corrected
    to sum g (x - m), and Q takes P (centre - m)."""
    n = tl.program_id(0)
    row = n.to(tl.int64) * C
    group_count = (C // G * L).to(tl.float64)
    length = L.to(tl.float64)
    for j0 in range(0, G, BLOCK_G):
        cs, mask, js, a, d, hc, v, s, rstd_g, rstd_c = _bcn_tile(
            m_ptr, v_ptr, stats_ptr, stats_ptr, stats_ptr + C, stats_ptr, w_ptr, b_ptr, gw_ptr, row, True, j0, C,
            G, eps, 2, AFFINE, BLOCK_G, BLOCK_K)
        s1 = tl.load(s1_ptr + row + cs, mask=mask, other=0.).to(tl.float64)
        offset = tl.load(centre_ptr + row + cs, mask=mask, other=0.).to(tl.float64) - \
            tl.load(m_ptr + row + cs, mask=mask, other=0.)
        s2 = tl.load(s2_ptr + row + cs, mask=mask, other=0.).to(tl.float64) + offset * s1
        t = tl.sum(a * s2 + hc * s1, 1)
        s1_group = tl.sum(s1, 1)
        p1 = -t * s * rstd_g * rstd_g / group_count
        q1 = -s * s1_group / group_count
        e1 = s[:, None] * s1 + length * (q1[:, None] + p1[:, None] * hc)
        e2 = s[:, None] * s2 + length * p1[:, None] * a * v
        tl.store(e1_ptr + row + cs, e1, mask=mask)
        tl.store(e2_ptr + row + cs, e2, mask=mask)
        group_mask = js < G
        tl.store(grp_ptr + n.to(tl.int64) * 2 * G + js, t * rstd_g, mask=group_mask)
        tl.store(grp_ptr + n.to(tl.int64) * 2 * G + G + js, s1_group, mask=group_mask)
        out_ty = a_ptr.dtype.element_ty
        tl.store(a_ptr + row + cs, (s[:, None] * a).to(out_ty), mask=mask)
        p = a * a * p1[:, None]
        tl.store(p_ptr + row + cs, p.to(out_ty), mask=mask)
        tl.store(q_ptr + row + cs, (a * (q1[:, None] + p1[:, None] * hc) + p * offset).to(out_ty), mask=mask)


@triton.jit
def _bcn_batch_terms(p_ptr, q_ptr, centre_ptr, stats_ptr, w_ptr, f1, f2, cs, mask, N, C, count, eps,
                     AFFINE: tl.constexpr):
    """Subtract BatchNorm's batch-statistics terms from P and Q of channels ``cs`` for all samples:
    P -= a rstd_c F2 / count, Q -= a (F1 + rstd_c (centre - mean_c) F2) / count (the change of P
    times the pass's centre offset included)."""
    mean_c = tl.load(stats_ptr + cs, mask=mask, other=0.)
    rstd_c = 1. / tl.sqrt(tl.load(stats_ptr + C + cs, mask=mask, other=1.) + eps)
    a = rstd_c
    if AFFINE:
        a = rstd_c * tl.load(w_ptr + cs, mask=mask, other=0.).to(tl.float64)
    total = tl.maximum(count, 1.)
    dp = a * rstd_c * f2 / total
    for n in range(0, N):
        offsets = n * C + cs
        d = tl.load(centre_ptr + offsets, mask=mask, other=0.).to(tl.float64) - mean_c
        p = tl.load(p_ptr + offsets, mask=mask, other=0.).to(tl.float64) - dp
        q = tl.load(q_ptr + offsets, mask=mask, other=0.).to(tl.float64) - a * (f1 / total) - d * dp
        tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bcn_channel_grad_kernel(e1_ptr, e2_ptr, grp_ptr, m_ptr, centre_ptr, stats_ptr, w_ptr, sums_ptr, dw_ptr, db_ptr,
                            dgw_ptr, dgb_ptr, f_ptr, p_ptr, q_ptr, N, C, G, eps,
                            AFFINE: tl.constexpr, BATCH: tl.constexpr, SYNC: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per channel, over the samples: F1 = sum E1 (= d bias) and F2 = rstd_c sum (E2 + (m - mean_c) E1)
    (= d weight); per group (the first programs): d group_weight and d group_bias. With batch
    statistics (BATCH) the input gradient's batch terms follow from F1 and F2 summed over the
    synchronized ranks: applied here without a process group, else F goes to ``f`` (float64) for
    the all-reduce and :func:`bcn_batch_terms_kernel`."""
    pid = tl.program_id(0)
    cs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    mean_c = tl.load(stats_ptr + cs, mask=mask, other=0.)
    rstd_c = 1. / tl.sqrt(tl.load(stats_ptr + C + cs, mask=mask, other=1.) + eps)
    f1 = tl.zeros([BLOCK_C], tl.float64)
    f2 = tl.zeros([BLOCK_C], tl.float64)
    for n in range(0, N):
        offsets = n * C + cs
        e1 = tl.load(e1_ptr + offsets, mask=mask, other=0.)
        d = tl.load(m_ptr + offsets, mask=mask, other=0.).to(tl.float64) - mean_c
        f1 += e1
        f2 += tl.load(e2_ptr + offsets, mask=mask, other=0.) + d * e1
    f2 = f2 * rstd_c
    js = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    group_mask = js < G
    if AFFINE:
        tl.store(dw_ptr + cs, f2.to(dw_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + cs, f1.to(db_ptr.dtype.element_ty), mask=mask)
        d_gw = tl.zeros([BLOCK_G], tl.float64)
        d_gb = tl.zeros([BLOCK_G], tl.float64)
        for n in range(0, N):
            d_gw += tl.load(grp_ptr + n * 2 * G + js, mask=group_mask, other=0.)
            d_gb += tl.load(grp_ptr + n * 2 * G + G + js, mask=group_mask, other=0.)
        tl.store(dgw_ptr + js, d_gw.to(dgw_ptr.dtype.element_ty), mask=group_mask)
        tl.store(dgb_ptr + js, d_gb.to(dgb_ptr.dtype.element_ty), mask=group_mask)
    if BATCH:
        if SYNC:
            tl.store(f_ptr + cs, f1, mask=mask)
            tl.store(f_ptr + C + cs, f2, mask=mask)
        else:
            _bcn_batch_terms(p_ptr, q_ptr, centre_ptr, stats_ptr, w_ptr, f1, f2, cs, mask, N, C,
                             tl.load(sums_ptr + 2 * C), eps, AFFINE)


@triton.jit
def bcn_batch_terms_kernel(f_ptr, centre_ptr, stats_ptr, w_ptr, sums_ptr, p_ptr, q_ptr, N, C, eps,
                           AFFINE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The batch terms of synchronized BCN's input gradient, from the all-reduced F1 and F2."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    f1 = tl.load(f_ptr + cs, mask=mask, other=0.)
    f2 = tl.load(f_ptr + C + cs, mask=mask, other=0.)
    _bcn_batch_terms(p_ptr, q_ptr, centre_ptr, stats_ptr, w_ptr, f1, f2, cs, mask, N, C, tl.load(sums_ptr + 2 * C),
                     eps, AFFINE)
