"""Triton forward kernel for per-head block-sparse attention.

One program computes one query tile (BLOCK_M positions, aligned in position space) of one
(batch, query head). It walks the tile's entry list from the layout's :class:`TileTable`: each
step gathers ``BLOCK_N // UNIT`` key units (each ``UNIT`` contiguous keys, anywhere in the
sequence), so a tile may span several small query blocks (Merge-Q) and several scattered key
blocks while every ``tl.dot`` stays full size. Entries before ``nfull`` need no mask; the rest
apply the per-sub-block bits, causality and bounds. With HALVES (fixed lengths, tiles of >= 128
rows) the tile runs as two half tiles sharing each K/V step, so one half's P @ V overlaps the
other's softmax. With SPLIT (decode-sized launches over long rows) a tile's entries are shared
out over several programs, each writing a partial (out, lse) that ``s2_merge_splits_kernel``
combines.
"""
import triton
import triton.language as tl


@triton.jit
def _row_offsets(rows, stride, INT64: tl.constexpr):
    # one return: two returns of different types (int64 / int32) fail to compile
    if INT64:
        off = rows.to(tl.int64) * stride
    else:
        off = rows * stride
    return off


@triton.jit
def _kv_offsets(krow, skn, ok, PT, s_page, PAGE: tl.constexpr, INT64: tl.constexpr):
    """Offsets of key rows ``krow``: ``krow * skn``, or with PAGE > 0 (a paged cache) row
    ``krow % PAGE`` of page ``PT[krow // PAGE]`` (``s_page`` elements a page)."""
    if PAGE > 0:
        page = tl.load(PT + krow // PAGE, mask=ok, other=0)
        off = page.to(tl.int64) * s_page + ((krow % PAGE) * skn).to(tl.int64)
    else:
        off = _row_offsets(krow, skn, INT64)
    return off


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking only what may be out of bounds."""
    if ROW_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _unit_rows(T_UNITS, idx, slot, within, offs, UNIT: tl.constexpr, G: tl.constexpr):
    """Token positions of the G units listed from T_UNITS[idx], UNIT tokens each; one unit per
    step is read as a scalar, so the rows are known to be contiguous; -1 units stay negative."""
    if G == 1:
        u = tl.load(T_UNITS + idx)
        pos = u * UNIT + offs
        ok = (offs * 0 + u) >= 0
    else:
        u = tl.load(T_UNITS + idx + slot)
        pos = u * UNIT + within
        ok = u >= 0
    return pos, ok


@triton.jit
def _tile_entries(T_NFULL, T_NTOT, p_head, m, t0, n_tab_tiles, tab_len):
    """(unmasked entries, all entries, offset of its entry list) of tile m of pattern p_head;
    tiles outside the table have no entries."""
    has_tab = (m >= t0) & (m < t0 + n_tab_tiles)
    ti = tl.where(has_tab, m - t0, 0)
    trow = p_head.to(tl.int64) * n_tab_tiles + ti
    nfull = tl.load(T_NFULL + trow, mask=has_tab, other=0)
    ntot = tl.load(T_NTOT + trow, mask=has_tab, other=0)
    return nfull, ntot, trow * tab_len


@triton.jit
def _program_ids(ORDER, n_prog_tiles, H, ORDERED: tl.constexpr):
    """(tile index, batch, head) of this program: from ORDER (heaviest tiles first) or the grid."""
    if ORDERED:
        w = tl.load(ORDER + tl.program_id(0))
        pid_t = w % n_prog_tiles
        h = w // n_prog_tiles
        b = tl.program_id(1)
    else:
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
    return pid_t, b, h


@triton.jit
def _full_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, idx, slot, within, offs_n, offs_d,
             d_ok, ks, nk, UNIT: tl.constexpr, G: tl.constexpr, INT64: tl.constexpr,
             VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PT=None, s_page=0,
             PAGE: tl.constexpr = 0):
    """One unmasked step's K/V tiles (forward and dq) and which keys exist: a full entry is in
    bounds unless the batch is packed (VARLEN)."""
    kpos, _ = _unit_rows(T_UNITS, idx, slot, within, offs_n, UNIT, G)
    krow = kpos - ks
    k_ok = krow < nk
    kk = _load_rows(K + base_k + _kv_offsets(krow, skn, k_ok, PT, s_page, PAGE, INT64)[:, None]
                    + offs_d[None, :] * skd, k_ok, d_ok, VARLEN, EVEN_D)
    vv = _load_rows(V + base_v + _kv_offsets(krow, svn, k_ok, PT, s_page, PAGE, INT64)[:, None]
                    + offs_d[None, :] * svd, k_ok, d_ok, VARLEN, EVEN_D)
    return kk, vv, k_ok


@triton.jit
def _unmasked_kv(K, V, DESC_K, DESC_V, base_k, base_v, skn, skd, svn, svd, T_UNITS, idx, b, hk, Nk,
                 slot, within, offs_n, offs_d, d_ok, ks, nk, HEAD_D: tl.constexpr,
                 UNIT: tl.constexpr, G: tl.constexpr, INT64: tl.constexpr, VARLEN: tl.constexpr,
                 EVEN_D: tl.constexpr, TMA: tl.constexpr, PT=None, s_page=0,
                 PAGE: tl.constexpr = 0):
    """The forward's unmasked step: whole K/V tiles by TMA where the host made descriptors (one
    unit per step, in bounds, never VARLEN), else gathered unit by unit (_full_kv)."""
    if TMA:
        u = tl.load(T_UNITS + idx)
        r0 = b * Nk + u * UNIT - ks
        kk = DESC_K.load([r0, hk * HEAD_D])
        vv = DESC_V.load([r0, hk * HEAD_D])
        k_ok = offs_n < UNIT * G  # all true: TMA steps are whole and in bounds
    else:
        kk, vv, k_ok = _full_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, idx, slot, within,
                                offs_n, offs_d, d_ok, ks, nk, UNIT, G, INT64, VARLEN, EVEN_D, PT,
                                s_page, PAGE)
    return kk, vv, k_ok


@triton.jit
def _masked_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS, idx, slot, within, offs_n,
               offs_d, d_ok, ks, nk, UNIT: tl.constexpr, G: tl.constexpr, INT64: tl.constexpr,
               PT=None, s_page=0, PAGE: tl.constexpr = 0):
    """One masked step's K/V units listed at T_UNITS[idx], their positions, which keys exist,
    and the sub-block bits of each key's unit."""
    kpos, u_ok = _unit_rows(T_UNITS, idx, slot, within, offs_n, UNIT, G)
    bits = tl.load(T_BITS + idx + slot)
    krow = kpos - ks
    k_ok = u_ok & (krow >= 0) & (krow < nk)
    kk = tl.load(K + base_k + _kv_offsets(krow, skn, k_ok, PT, s_page, PAGE, INT64)[:, None]
                 + offs_d[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    vv = tl.load(V + base_v + _kv_offsets(krow, svn, k_ok, PT, s_page, PAGE, INT64)[:, None]
                 + offs_d[None, :] * svd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return kk, vv, kpos, k_ok, bits


@triton.jit
def _apply_mask(s, bits, sub_r, k_ok, kpos, pos_m, CAUSAL: tl.constexpr):
    """-inf where the sub-block bits, causality or the bounds exclude a key."""
    mk = (((bits[None, :] >> sub_r[:, None]) & 1) != 0) & k_ok[None, :]
    if CAUSAL:
        mk = mk & (kpos[None, :] <= pos_m[:, None])
    return tl.where(mk, s, float("-inf"))


@triton.jit
def _masked_scores(q, K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS, idx, slot, within,
                   offs_n, offs_d, d_ok, sub_r, pos_m, ks, nk, sm_scale_log2, UNIT: tl.constexpr,
                   G: tl.constexpr, CAUSAL: tl.constexpr, INT64: tl.constexpr,
                   DOT_PREC: tl.constexpr, PT=None, s_page=0, PAGE: tl.constexpr = 0):
    """One masked step (forward and dq): the K/V units listed at T_UNITS[idx] and the scaled
    scores q @ k^T (base-2), -inf where the sub-block bits, causality or the bounds exclude a key."""
    kk, vv, kpos, k_ok, bits = _masked_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS,
                                          idx, slot, within, offs_n, offs_d, d_ok, ks, nk, UNIT, G,
                                          INT64, PT, s_page, PAGE)
    s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * sm_scale_log2
    return _apply_mask(s, bits, sub_r, k_ok, kpos, pos_m, CAUSAL), kk, vv


@triton.jit
def _softmax_pv(qk, vv, m_i, l_i, acc, k_ok, sm_scale_log2, POS_SCALE: tl.constexpr,
                VARLEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """One unmasked online-softmax step from raw scores, the scale folded into the exponent.
    With VARLEN, keys past the sequence's end (not k_ok) are dropped: a row may see none."""
    if VARLEN:
        qk = tl.where(k_ok[None, :], qk, float("inf") if not POS_SCALE else float("-inf"))
    if POS_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
    else:
        m_new = tl.maximum(m_i, tl.min(qk, 1) * sm_scale_log2)
    if VARLEN:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(qk * sm_scale_log2 - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(vv.dtype), vv, acc, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _masked_softmax_pv(s, vv, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax step from scaled, already masked scores (rows may be all -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(vv.dtype), vv, acc, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _store_rows(O, LSE, base_o, base_l, rows, row_ok, offs_d, d_ok, m_i, l_i, acc, son, sod, sln,
                head_o, head_l, INT64: tl.constexpr):
    """Normalise and store a tile's rows: output 0 and lse -inf where a row saw no key.
    ``head_o``/``head_l``: each row's offset for its head where a tile packs several (else 0)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    ro = _row_offsets(rows, son, INT64) + head_o
    tl.store(O + base_o + ro[:, None] + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + base_l + _row_offsets(rows, sln, INT64) + head_l, lse, mask=row_ok)


@triton.jit
def _masked_steps(q, m_i, l_i, acc, K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS, toff,
                  nfull, ntot, slot, within, offs_n, offs_d, d_ok, sub_r, pos_m, ks, nk,
                  sm_scale_log2, UNIT: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr,
                  INT64: tl.constexpr, DOT_PREC: tl.constexpr, FUSED: tl.constexpr, PT=None,
                  s_page=0, PAGE: tl.constexpr = 0):
    """Online-softmax steps over the entries nfull..ntot, which need the sub-block bits,
    causality and bounds."""
    # not software-pipelined: with num_stages > 1 Triton 3.6 gives wrong results here on an
    # H100/H200 when a step gathers several units, and it is no faster with one (benchmarks/NOTES.md)
    for e in tl.range(nfull, ntot, G, num_stages=1):
        s, kk, vv = _masked_scores(q, K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS,
                                   toff + e, slot, within, offs_n, offs_d, d_ok, sub_r, pos_m, ks,
                                   nk, sm_scale_log2, UNIT, G, CAUSAL, INT64, DOT_PREC, PT,
                                   s_page, PAGE)
        if FUSED:
            m_i, l_i, acc = _masked_softmax_pv(s, vv, m_i, l_i, acc, DOT_PREC)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_tile_halves(Q, O, LSE, K, V, DESC_K, DESC_V, T_UNITS, T_BITS, toff, nfull, ntot,
                     base_q, base_o, base_l, base_k, base_v, m, b, hk, qs, ks, nq, nk, Nk,
                     sqn, sqd, son, sod, sln, skn, skd, svn, svd, sm_scale_log2,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, UNIT: tl.constexpr, SUB: tl.constexpr,
                     CAUSAL: tl.constexpr, INT64: tl.constexpr, DOT_PREC: tl.constexpr,
                     POS_SCALE: tl.constexpr, TMA: tl.constexpr):
    """A query tile as two half tiles sharing every K/V step. Both halves' q @ k^T are computed
    before either softmax, and the first half's P @ V is issued asynchronously, so it runs on
    the tensor cores while the second half's exponentials run (FA3's intra-warpgroup overlap;
    7% faster at 32k on an H200). Fixed-length batches with the scale folded (FUSED) only."""
    HALF: tl.constexpr = BLOCK_M // 2
    G: tl.constexpr = BLOCK_N // UNIT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n // UNIT
    within = offs_n % UNIT
    pos_a = m * BLOCK_M + tl.arange(0, HALF)
    pos_b = pos_a + HALF
    rows_a = pos_a - qs
    rows_b = pos_b - qs
    ok_a = (rows_a >= 0) & (rows_a < nq)
    ok_b = (rows_b >= 0) & (rows_b < nq)
    q_a = tl.load(Q + base_q + _row_offsets(rows_a, sqn, INT64)[:, None] + offs_d[None, :] * sqd,
                  mask=ok_a[:, None] & d_ok[None, :], other=0.0)
    q_b = tl.load(Q + base_q + _row_offsets(rows_b, sqn, INT64)[:, None] + offs_d[None, :] * sqd,
                  mask=ok_b[:, None] & d_ok[None, :], other=0.0)
    m_a = tl.full([HALF], float("-inf"), tl.float32)
    m_b = tl.full([HALF], float("-inf"), tl.float32)
    l_a = tl.zeros([HALF], tl.float32)
    l_b = tl.zeros([HALF], tl.float32)
    acc_a = tl.zeros([HALF, BLOCK_D], tl.float32)
    acc_b = tl.zeros([HALF, BLOCK_D], tl.float32)
    for e in range(0, nfull, G):
        kk, vv, k_ok = _unmasked_kv(K, V, DESC_K, DESC_V, base_k, base_v, skn, skd, svn, svd,
                                    T_UNITS, toff + e, b, hk, Nk, slot, within, offs_n, offs_d,
                                    d_ok, ks, nk, HEAD_D, UNIT, G, INT64, False,
                                    BLOCK_D == HEAD_D, TMA)
        kt = tl.trans(kk)
        qk_a = tl.dot(q_a, kt, input_precision=DOT_PREC)
        qk_b = tl.dot(q_b, kt, input_precision=DOT_PREC)
        m_a, l_a, acc_a = _softmax_pv(qk_a, vv, m_a, l_a, acc_a, k_ok, sm_scale_log2, POS_SCALE,
                                      False, DOT_PREC)
        m_b, l_b, acc_b = _softmax_pv(qk_b, vv, m_b, l_b, acc_b, k_ok, sm_scale_log2, POS_SCALE,
                                      False, DOT_PREC)

    sub_a = tl.arange(0, HALF) // SUB
    sub_b = (tl.arange(0, HALF) + HALF) // SUB
    # not software-pipelined, as in _masked_steps
    for e in tl.range(nfull, ntot, G, num_stages=1):
        kk, vv, kpos, k_ok, bits = _masked_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS,
                                              T_BITS, toff + e, slot, within, offs_n, offs_d, d_ok,
                                              ks, nk, UNIT, G, INT64)
        kt = tl.trans(kk)
        s_a = tl.dot(q_a, kt, input_precision=DOT_PREC) * sm_scale_log2
        s_b = tl.dot(q_b, kt, input_precision=DOT_PREC) * sm_scale_log2
        s_a = _apply_mask(s_a, bits, sub_a, k_ok, kpos, pos_a, CAUSAL)
        s_b = _apply_mask(s_b, bits, sub_b, k_ok, kpos, pos_b, CAUSAL)
        m_a, l_a, acc_a = _masked_softmax_pv(s_a, vv, m_a, l_a, acc_a, DOT_PREC)
        m_b, l_b, acc_b = _masked_softmax_pv(s_b, vv, m_b, l_b, acc_b, DOT_PREC)

    _store_rows(O, LSE, base_o, base_l, rows_a, ok_a, offs_d, d_ok, m_a, l_a, acc_a, son, sod, sln,
                0, 0, INT64)
    _store_rows(O, LSE, base_o, base_l, rows_b, ok_b, offs_d, d_ok, m_b, l_b, acc_b, son, sod, sln,
                0, 0, INT64)


@triton.jit
def s2_fwd_kernel(
    Q, K, V, O, LSE,
    T_UNITS, T_BITS, T_NFULL, T_NTOT,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh, sod,
    slb, slh, sln,
    CU_Q, CU_K, ORDER, DESC_K, DESC_V,
    Nq, Nk, q_start, k_start,
    H, KV_GROUP, TAB_GROUP, t0, n_tab_tiles, tab_len, m_first, n_prog_tiles,
    sm_scale_log2, n_splits, sos, sls, PAGE_T, spt, spt_h, s_page,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIT: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    INT64: tl.constexpr, DOT_PREC: tl.constexpr, ORDERED: tl.constexpr,
    FUSED: tl.constexpr, POS_SCALE: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr,
    HALVES: tl.constexpr = False, PACK: tl.constexpr = 1, CACHE: tl.constexpr = False,
    TAB_DIV: tl.constexpr = 1, PAGE: tl.constexpr = 0,
):
    # PACK > 1 (decode tiles): one program takes PACK query heads of one KV head, BLOCK_M // PACK
    # query positions each, so the K/V of a GQA group is read once; H counts head packs.
    # CACHE (a preallocated KV cache of Nk slots a sequence): CU_K holds each sequence's key
    # count, read here, so one launch (one CUDA graph) serves every length; the queries are the
    # last Nq positions; program pid_m takes the pid_m-th tile from the one holding the first
    # query (m_first: Nq // TQ + 1, so that floor division sees no negative number); the table's
    # tiles are TAB_DIV of ours. PAGE > 0 (with CACHE): K/V are pages of PAGE slots, s_page
    # elements a page; row b of PAGE_T (spt apart) lists the pages of sequence b, and the batch
    # strides are 0. With spt_h > 0 each KV head has its own pages (row (b, hk) of PAGE_T) and
    # the head strides are 0.
    pid_m, b, h = _program_ids(ORDER, n_prog_tiles, H, ORDERED)
    h = h * PACK
    hk = h // KV_GROUP
    TQ: tl.constexpr = BLOCK_M // PACK   # query positions per tile
    if VARLEN:
        q_off = tl.load(CU_Q + b)
        k_off = tl.load(CU_K + b)
        nq = tl.load(CU_Q + b + 1) - q_off
        nk = tl.load(CU_K + b + 1) - k_off
        qs = nk - nq
        ks = 0
        base_q = q_off.to(tl.int64) * sqn
        base_k = k_off.to(tl.int64) * skn
        base_v = k_off.to(tl.int64) * svn
        base_o = q_off.to(tl.int64) * son
        base_l = q_off.to(tl.int64) * sln
    else:
        nq = Nq
        if CACHE:
            nk = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), Nk)
            qs = nk - Nq
        else:
            nk = Nk
            qs = q_start
        ks = k_start
        base_q = b.to(tl.int64) * sqb
        base_k = b.to(tl.int64) * skb
        base_v = b.to(tl.int64) * svb
        base_o = b.to(tl.int64) * sob
        base_l = b.to(tl.int64) * slb
    base_q += h.to(tl.int64) * sqh
    base_o += h.to(tl.int64) * soh
    base_l += h.to(tl.int64) * slh
    base_k += hk.to(tl.int64) * skh
    base_v += hk.to(tl.int64) * svh
    if PAGE > 0:
        pt = PAGE_T + b.to(tl.int64) * spt + hk.to(tl.int64) * spt_h
    else:
        pt = PAGE_T

    if CACHE:
        m = (qs + m_first * TQ) // TQ - m_first + pid_m
    else:
        m = m_first + pid_m
    if (m * TQ - qs >= nq) | ((m + 1) * TQ - qs <= 0):
        return
    if TAB_DIV > 1:
        mt = tl.where(m >= 0, m // TAB_DIV, -1)
    else:
        mt = m
    nfull, ntot, toff = _tile_entries(T_NFULL, T_NTOT, h // TAB_GROUP, mt, t0, n_tab_tiles, tab_len)
    if HALVES:
        _fwd_tile_halves(Q, O, LSE, K, V, DESC_K, DESC_V, T_UNITS, T_BITS, toff, nfull, ntot,
                         base_q, base_o, base_l, base_k, base_v, m, b, hk, qs, ks, nq, nk, Nk,
                         sqn, sqd, son, sod, sln, skn, skd, svn, svd, sm_scale_log2, HEAD_D,
                         BLOCK_D, BLOCK_M, BLOCK_N, UNIT, SUB, CAUSAL, INT64, DOT_PREC, POS_SCALE,
                         TMA)
        return
    if PACK > 1:   # row r: head h + r // TQ, position m * TQ + r % TQ
        r_pos = tl.arange(0, BLOCK_M) % TQ
        r_head = (tl.arange(0, BLOCK_M) // TQ).to(tl.int64)
        pos_m = m * TQ + r_pos
        sub_r = r_pos // SUB
        head_q = r_head * sqh
        head_o = r_head * soh
        head_l = r_head * slh
    else:
        pos_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        sub_r = tl.arange(0, BLOCK_M) // SUB
        head_q = 0
        head_o = 0
        head_l = 0
    if TAB_DIV > 1:   # the row's sub-block within the table's (larger) tile
        sub_r = (pos_m - mt * (TQ * TAB_DIV)) // SUB
    rows = pos_m - qs
    row_ok = (rows >= 0) & (rows < nq)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(Q + base_q + (_row_offsets(rows, sqn, INT64) + head_q)[:, None]
                + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    G: tl.constexpr = BLOCK_N // UNIT
    if SPLIT:  # split-K: this program takes one of n_splits equal runs of the tile's entries
        split = tl.program_id(2)
        chunk = tl.cdiv(tl.cdiv(ntot, G), n_splits) * G
        e_lo = split * chunk
        e_hi = tl.minimum(e_lo + chunk, ntot)
        f_lo = tl.minimum(e_lo, nfull)
        f_hi = tl.minimum(e_hi, nfull)
        g_lo = tl.maximum(e_lo, nfull)
        g_hi = tl.maximum(e_hi, nfull)
        base_o += split.to(tl.int64) * sos
        base_l += split.to(tl.int64) * sls
    else:
        f_lo = 0
        f_hi = nfull
        g_lo = nfull
        g_hi = ntot

    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n // UNIT
    within = offs_n % UNIT

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if f_hi > f_lo:
        for e in range(f_lo, f_hi, G):
            kk, vv, k_ok = _unmasked_kv(K, V, DESC_K, DESC_V, base_k, base_v, skn, skd, svn, svd,
                                        T_UNITS, toff + e, b, hk, Nk, slot, within, offs_n, offs_d,
                                        d_ok, ks, nk, HEAD_D, UNIT, G, INT64, VARLEN,
                                        BLOCK_D == HEAD_D, TMA, pt, s_page, PAGE)
            if FUSED:  # the scale folded into one multiply-add per score; P @ V accumulates in place
                qk = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC)
                m_i, l_i, acc = _softmax_pv(qk, vv, m_i, l_i, acc, k_ok, sm_scale_log2, POS_SCALE,
                                            VARLEN, DOT_PREC)
            else:
                s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * sm_scale_log2
                if VARLEN:  # keys past this sequence's end: a whole row may be masked here
                    s = tl.where(k_ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                else:
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_use = m_new
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PREC)
                m_i = m_new

    if g_hi > g_lo:
        m_i, l_i, acc = _masked_steps(
            q, m_i, l_i, acc, K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, T_BITS, toff,
            g_lo, g_hi, slot, within, offs_n, offs_d, d_ok, sub_r, pos_m, ks, nk, sm_scale_log2,
            UNIT, G, CAUSAL, INT64, DOT_PREC, FUSED, pt, s_page, PAGE)

    _store_rows(O, LSE, base_o, base_l, rows, row_ok, offs_d, d_ok, m_i, l_i, acc, son, sod, sln,
                head_o, head_l, INT64)


# A decode step adds a key each call: this copy of the kernel does not specialise on the lengths
# and offsets that change (Triton would compile a new variant each time one of them becomes
# divisible by 16). Prefill keeps the specialised kernel: 3% faster on an H100.
s2_fwd_kernel_varying = triton.jit(do_not_specialize=[
    "slb", "slh", "Nq", "Nk", "q_start", "k_start", "t0", "n_tab_tiles", "tab_len", "m_first",
    "n_prog_tiles", "n_splits", "sos", "sls",
])(s2_fwd_kernel.fn)


@triton.jit
def s2_merge_splits_kernel(OP, LP, O, LSE, n_splits, H, NQ, HEAD_D: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge split-K partials: row r of OP [S, R, HEAD_D] (each normalised by its own sum) and
    LP [S, R] (their lse) into O [R, HEAD_D] and LSE; rows are (outer, head) pairs, and the lse
    of row r sits at (outer // NQ) * H * NQ + head * NQ + outer % NQ ([B, H, Nq] or [H, T])."""
    r = tl.program_id(0)
    R = tl.num_programs(0)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    lp = tl.load(LP + offs_s.to(tl.int64) * R + r, mask=s_ok, other=float("-inf"))
    m = tl.max(lp, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lp - m_safe)
    tot = tl.sum(w, 0)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    op = tl.load(OP + (offs_s.to(tl.int64) * R + r)[:, None] * HEAD_D + offs_d[None, :],
                 mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(op * w[:, None], 0) / tot_safe
    tl.store(O + r.to(tl.int64) * HEAD_D + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    outer = r // H
    head = r % H
    lse = tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot_safe))
    tl.store(LSE + (outer // NQ).to(tl.int64) * H * NQ + head * NQ + outer % NQ, lse)
