"""Triton kernels of the row-wise passes of :mod:`norm_plugins.ops.rowwise` over x (N, C, L).

One kernel per pass; :mod:`norm_plugins.ops.triton_rowwise` plans and launches them::

    moments_kernel             per-(n, c) mean and M2 (per-lane Welford, lanes merged exactly)
    grad_sums_kernel           per-(n, c) sum_l g and sum_l g * (x - M)
    normalize_kernel           y  = (x - M) * A + B
    normalize_backward_kernel  dx = g * a + (x - M) * P + Q
    combine_kernel             merges the per-chunk partials of a reduction whose rows were split

Every program handles a tile of ``BLOCK_C`` channels of one sample and walks ``chunk`` positions of
L in steps of ``BLOCK_L``. Strides are arguments, so NCL-contiguous, channels-last and any other
(N, C, L) strides (a channel slice, x, g and the output independently) are read in place, and
(N, C) coefficients may be broadcast views (stride 0). Accumulation is in the dtype of the (N, C)
tensors (float32, float64 for float64 inputs); loads upcast and stores round to the output's dtype.

Two launch flags keep addressing right and wide:

- ``INT64``: channel and position indices are 64-bit before they meet a stride, for a sample of
  2^31 elements or more (32-bit products would wrap); sample offsets are always 64-bit.
- ``ROW_ALIGN``: when every full-size tensor of the launch has unit stride along L, and L and their
  other strides are multiples of a 16-byte vector's elements (4 float32, 8 bfloat16) but not of 16,
  that vector's length (1 otherwise: Triton's specialization knows divisibility by 16 itself, and
  shorter vectors are not worth a variant). Without this hint rows of L = 4200 (P4 of 800x1344)
  would load 4 bytes at a time although they start 16-byte aligned; with it they load 16.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_origin(C, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """This program's sample (int64: sample offsets must not overflow), its channels and their mask."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // c_blocks).to(tl.int64)
    cs = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    if INT64:
        cs = cs.to(tl.int64)
    return n, cs, mask


@triton.jit
def _rows(ptr, n, cs, stride_n, stride_c, ROW_ALIGN: tl.constexpr):
    """Pointers to the first element of the tile's rows (a [BLOCK_C, 1] column)."""
    offsets = n * stride_n + cs * stride_c
    if ROW_ALIGN > 1:
        offsets = tl.multiple_of(offsets, ROW_ALIGN)
    return ptr + offsets[:, None]


@triton.jit
def _positions(l0, BLOCK_L: tl.constexpr, INT64: tl.constexpr):
    """The positions l0 .. l0 + BLOCK_L as a [1, BLOCK_L] row."""
    ls = l0 + tl.arange(0, BLOCK_L)
    if INT64:
        ls = ls.to(tl.int64)
    return ls[None, :]


@triton.jit
def _chunk_bounds(L, chunk, ROW_ALIGN: tl.constexpr):
    """This program's positions: the row ends it masks at are multiples of ROW_ALIGN too, so masks
    stay constant over vectors of that width."""
    if ROW_ALIGN > 1:
        # multiple_of annotates the op that makes a value, and an argument has none: max(L, 0) is one.
        L = tl.multiple_of(tl.maximum(L, 0), ROW_ALIGN)
    start = tl.program_id(1) * chunk
    return start, tl.minimum(start + chunk, L)


@triton.jit
def _load_coefficient(ptr, n, cs, c_mask, stride_n, stride_c):
    """An (N, C) coefficient for the tile's channels, as a [BLOCK_C, 1] column in its own dtype."""
    return tl.load(ptr + n * stride_n + cs * stride_c, mask=c_mask, other=0.)[:, None]


@triton.jit
def _store_pair(first, second, out1_ptr, out2_ptr, part_ptr, R, rows, mask, FINAL: tl.constexpr):
    """Per-row results of a reduction: the final (N, C) outputs when rows are not split, else this
    chunk's slot in the (2, R, split) partials."""
    if FINAL:
        tl.store(out1_ptr + rows, first, mask=mask)
        tl.store(out2_ptr + rows, second, mask=mask)
    else:
        offsets = rows * tl.num_programs(1) + tl.program_id(1)
        tl.store(part_ptr + offsets, first, mask=mask)
        tl.store(part_ptr + R * tl.num_programs(1) + offsets, second, mask=mask)


@triton.jit
def moments_kernel(x_ptr, mean_ptr, var_ptr, part_ptr, R, C, L, chunk,
                   stride_xn, stride_xc, stride_xl,
                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr, INT64: tl.constexpr,
                   ROW_ALIGN: tl.constexpr):
    """Mean and M2 = sum (x - mean)^2 of one chunk of BLOCK_C rows (mean and M2 / L when FINAL).

    Every lane runs Welford over the positions it visits, on x minus the row's first value: with
    |mean| >> std the shifted values keep every digit a float32 running mean would round away. The
    lanes are then merged exactly, M2 = sum_lanes M2_lane + count_lane * (mean_lane - mean)^2.
    Partials keep the shift (every chunk of a row shares it); the final mean adds it back in the
    mean's dtype (float64), where nothing of the shifted mean is lost.
    """
    acc_ty = var_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C, INT64)
    start, end = _chunk_bounds(L, chunk, ROW_ALIGN)
    x_base = _rows(x_ptr, n, cs, stride_xn, stride_xc, ROW_ALIGN)
    shift = tl.load(x_base, mask=c_mask[:, None], other=0.).to(acc_ty)
    lanes = tl.arange(0, BLOCK_L)
    mean = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    m2 = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    for l0 in range(start, end, BLOCK_L):
        ls = _positions(l0, BLOCK_L, INT64)
        mask = c_mask[:, None] & (ls < end)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty) - shift
        # Only a chunk's last tile is partial, so every active lane has now seen this many values.
        inv_seen = 1.0 / ((l0 - start) // BLOCK_L + 1).to(acc_ty)
        delta = tl.where(mask, v - mean, 0.)
        mean += delta * inv_seen
        m2 += delta * (v - mean)
    total = end - start
    counts = (total // BLOCK_L + (lanes < total % BLOCK_L).to(tl.int32)).to(acc_ty)
    chunk_mean = tl.sum(mean * counts[None, :], axis=1) / tl.cast(total, acc_ty)
    spread = mean - chunk_mean[:, None]
    chunk_m2 = tl.sum(m2 + counts[None, :] * spread * spread, axis=1)
    if FINAL:
        mean_ty = mean_ptr.dtype.element_ty
        chunk_mean = chunk_mean.to(mean_ty) + tl.reshape(shift, [BLOCK_C]).to(mean_ty)
        chunk_m2 = chunk_m2 / tl.cast(total, acc_ty)
    _store_pair(chunk_mean, chunk_m2, mean_ptr, var_ptr, part_ptr, R, n * C + cs, c_mask, FINAL)


@triton.jit
def grad_sums_kernel(g_ptr, x_ptr, m_ptr, sum_g_ptr, sum_gx_ptr, part_ptr, R, C, L, chunk,
                     stride_gn, stride_gc, stride_gl, stride_xn, stride_xc, stride_xl,
                     stride_mn, stride_mc,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr, INT64: tl.constexpr,
                     ROW_ALIGN: tl.constexpr):
    """sum g and sum g * (x - M) over one chunk of BLOCK_C rows."""
    acc_ty = sum_g_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C, INT64)
    start, end = _chunk_bounds(L, chunk, ROW_ALIGN)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc).to(acc_ty)
    g_base = _rows(g_ptr, n, cs, stride_gn, stride_gc, ROW_ALIGN)
    x_base = _rows(x_ptr, n, cs, stride_xn, stride_xc, ROW_ALIGN)
    sum_g = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    sum_gx = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    for l0 in range(start, end, BLOCK_L):
        ls = _positions(l0, BLOCK_L, INT64)
        mask = c_mask[:, None] & (ls < end)
        g = tl.load(g_base + ls * stride_gl, mask=mask, other=0.).to(acc_ty)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        sum_g += g
        sum_gx += g * (v - centre)
    _store_pair(tl.sum(sum_g, axis=1), tl.sum(sum_gx, axis=1), sum_g_ptr, sum_gx_ptr, part_ptr, R,
                n * C + cs, c_mask, FINAL)


@triton.jit
def combine_kernel(part_ptr, x_ptr, out1_ptr, out2_ptr, R, C, L, chunk, n_split,
                   stride_xn, stride_xc,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, MOMENTS: tl.constexpr):
    """Merges the (2, R, n_split) per-chunk partials of BLOCK_R rows: plain sums, or (MOMENTS)
    chunk means (shifted by the row's first value x[n, c, 0]) and M2 by Chan's formula into mean
    and biased variance (the mean in out1's dtype, float64)."""
    acc_ty = out2_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    slots = tl.arange(0, BLOCK_S)
    row_mask = rows < R
    mask = row_mask[:, None] & (slots < n_split)[None, :]
    offsets = rows[:, None] * n_split + slots[None, :]
    first = tl.load(part_ptr + offsets, mask=mask, other=0.)
    second = tl.load(part_ptr + R * n_split + offsets, mask=mask, other=0.)
    if MOMENTS:
        counts = tl.where(slots < n_split, tl.minimum(chunk, L - slots * chunk), 0).to(acc_ty)
        shifted_mean = tl.sum(first * counts[None, :], axis=1) / tl.cast(L, acc_ty)
        spread = first - shifted_mean[:, None]
        m2 = tl.sum(second + counts[None, :] * spread * spread, axis=1)
        row_starts = x_ptr + (rows // C).to(tl.int64) * stride_xn + (rows % C).to(tl.int64) * stride_xc
        mean_ty = out1_ptr.dtype.element_ty
        mean = tl.load(row_starts, mask=row_mask, other=0.).to(mean_ty) + shifted_mean.to(mean_ty)
        tl.store(out1_ptr + rows, mean, mask=row_mask)
        tl.store(out2_ptr + rows, m2 / tl.cast(L, acc_ty), mask=row_mask)
    else:
        tl.store(out1_ptr + rows, tl.sum(first, axis=1), mask=row_mask)
        tl.store(out2_ptr + rows, tl.sum(second, axis=1), mask=row_mask)


@triton.jit
def normalize_kernel(x_ptr, y_ptr, m_ptr, a_ptr, b_ptr, C, L, chunk,
                     stride_xn, stride_xc, stride_xl, stride_yn, stride_yc, stride_yl,
                     stride_mn, stride_mc, stride_an, stride_ac, stride_bn, stride_bc,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """y = (x - M) * A + B over one chunk of BLOCK_C rows, computed in M's dtype."""
    acc_ty = m_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C, INT64)
    start, end = _chunk_bounds(L, chunk, ROW_ALIGN)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc)
    scale = _load_coefficient(a_ptr, n, cs, c_mask, stride_an, stride_ac).to(acc_ty)
    shift = _load_coefficient(b_ptr, n, cs, c_mask, stride_bn, stride_bc).to(acc_ty)
    x_base = _rows(x_ptr, n, cs, stride_xn, stride_xc, ROW_ALIGN)
    y_base = _rows(y_ptr, n, cs, stride_yn, stride_yc, ROW_ALIGN)
    for l0 in range(start, end, BLOCK_L):
        ls = _positions(l0, BLOCK_L, INT64)
        mask = c_mask[:, None] & (ls < end)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        y = (v - centre) * scale + shift
        tl.store(y_base + ls * stride_yl, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_backward_kernel(g_ptr, x_ptr, dx_ptr, m_ptr, a_ptr, p_ptr, q_ptr, C, L, chunk,
                              stride_gn, stride_gc, stride_gl, stride_xn, stride_xc, stride_xl,
                              stride_dn, stride_dc, stride_dl, stride_mn, stride_mc,
                              stride_an, stride_ac, stride_pn, stride_pc, stride_qn, stride_qc,
                              BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr,
                              ROW_ALIGN: tl.constexpr):
    """dx = g * a + (x - M) * P + Q over one chunk of BLOCK_C rows, computed in M's dtype."""
    acc_ty = m_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C, INT64)
    start, end = _chunk_bounds(L, chunk, ROW_ALIGN)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc)
    a = _load_coefficient(a_ptr, n, cs, c_mask, stride_an, stride_ac).to(acc_ty)
    p = _load_coefficient(p_ptr, n, cs, c_mask, stride_pn, stride_pc).to(acc_ty)
    q = _load_coefficient(q_ptr, n, cs, c_mask, stride_qn, stride_qc).to(acc_ty)
    g_base = _rows(g_ptr, n, cs, stride_gn, stride_gc, ROW_ALIGN)
    x_base = _rows(x_ptr, n, cs, stride_xn, stride_xc, ROW_ALIGN)
    dx_base = _rows(dx_ptr, n, cs, stride_dn, stride_dc, ROW_ALIGN)
    for l0 in range(start, end, BLOCK_L):
        ls = _positions(l0, BLOCK_L, INT64)
        mask = c_mask[:, None] & (ls < end)
        g = tl.load(g_base + ls * stride_gl, mask=mask, other=0.).to(acc_ty)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        dx = g * a + (v - centre) * p + q
        tl.store(dx_base + ls * stride_dl, dx.to(dx_ptr.dtype.element_ty), mask=mask)
