"""Triton backward kernels for per-head block-sparse attention.

``s2_bwd_dq_kernel`` walks the forward table (tiles of queries, units of keys);
``s2_bwd_dkdv_kernel`` walks the transposed table (tiles of keys, units of queries) and sums the
query heads of a GQA group in registers, so neither needs atomics. ``delta`` is rowsum(dO * O)
minus the incoming gradient of lse, which is how gradients flow through lse.
"""
import triton
import triton.language as tl

from .triton_fwd import (_full_kv, _load_rows, _masked_scores, _program_ids, _row_offsets,
                         _tile_entries, _unit_rows)


@triton.jit
def _seq_geometry(CU_Q, CU_K, b, Nq, Nk, q_start, k_start, VARLEN: tl.constexpr):
    if VARLEN:
        q_off = tl.load(CU_Q + b)
        k_off = tl.load(CU_K + b)
        nq = tl.load(CU_Q + b + 1) - q_off
        nk = tl.load(CU_K + b + 1) - k_off
        qs = nk - nq
        ks = nk * 0
    else:
        q_off = b * 0
        k_off = b * 0
        nq = Nq
        nk = Nk
        qs = q_start
        ks = k_start
    return q_off, k_off, nq, nk, qs, ks


@triton.jit
def s2_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    T_UNITS, T_BITS, T_NFULL, T_NTOT,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdon, sdoh, sdod,
    sdqb, sdqn, sdqh, sdqd, slb, slh, sln,
    CU_Q, CU_K, ORDER,
    Nq, Nk, q_start, k_start,
    H, KV_GROUP, TAB_GROUP, t0, n_tab_tiles, tab_len, m_first, n_prog_tiles,
    sm_scale, sm_scale_log2,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIT: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    INT64: tl.constexpr, DOT_PREC: tl.constexpr, ORDERED: tl.constexpr,
):
    pid_m, b, h = _program_ids(ORDER, n_prog_tiles, H, ORDERED)
    hk = h // KV_GROUP
    q_off, k_off, nq, nk, qs, ks = _seq_geometry(CU_Q, CU_K, b, Nq, Nk, q_start, k_start, VARLEN)
    if VARLEN:
        bq = q_off.to(tl.int64)
        bk = k_off.to(tl.int64)
        base_q = bq * sqn
        base_do = bq * sdon
        base_dq = bq * sdqn
        base_l = bq * sln
        base_k = bk * skn
        base_v = bk * svn
    else:
        b64 = b.to(tl.int64)
        base_q = b64 * sqb
        base_do = b64 * sdob
        base_dq = b64 * sdqb
        base_l = b64 * slb
        base_k = b64 * skb
        base_v = b64 * svb
    h64 = h.to(tl.int64)
    base_q += h64 * sqh
    base_do += h64 * sdoh
    base_dq += h64 * sdqh
    base_l += h64 * slh
    base_k += hk.to(tl.int64) * skh
    base_v += hk.to(tl.int64) * svh

    m = m_first + pid_m
    if (m * BLOCK_M - qs >= nq) | ((m + 1) * BLOCK_M - qs <= 0):
        return
    pos_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pos_m - qs
    row_ok = (rows >= 0) & (rows < nq)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    qmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + base_q + _row_offsets(rows, sqn, INT64)[:, None] + offs_d[None, :] * sqd,
                mask=qmask, other=0.0)
    do = tl.load(DO + base_do + _row_offsets(rows, sdon, INT64)[:, None] + offs_d[None, :] * sdod,
                 mask=qmask, other=0.0)
    lse = tl.load(LSE + base_l + _row_offsets(rows, sln, INT64), mask=row_ok, other=0.0)
    delta = tl.load(DELTA + base_l + _row_offsets(rows, sln, INT64), mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)

    nfull, ntot, toff = _tile_entries(T_NFULL, T_NTOT, h // TAB_GROUP, m, t0, n_tab_tiles, tab_len)

    G: tl.constexpr = BLOCK_N // UNIT
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n // UNIT
    within = offs_n % UNIT
    sub_r = tl.arange(0, BLOCK_M) // SUB
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if nfull > 0:
        for e in range(0, nfull, G):
            kk, vv, k_ok = _full_kv(K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS, toff + e,
                                    slot, within, offs_n, offs_d, d_ok, ks, nk, UNIT, G, INT64,
                                    VARLEN, BLOCK_D == HEAD_D)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * sm_scale_log2
            if VARLEN:
                s = tl.where(k_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PREC)
    if ntot > nfull:
        # not software-pipelined: with num_stages > 1 Triton 3.6 gives wrong results here on an
        # H100/H200 when a step gathers several units (benchmarks/NOTES.md)
        for e in tl.range(nfull, ntot, G, num_stages=1):
            s, kk, vv = _masked_scores(q, K, V, base_k, base_v, skn, skd, svn, svd, T_UNITS,
                                       T_BITS, toff + e, slot, within, offs_n, offs_d, d_ok, sub_r,
                                       pos_m, ks, nk, sm_scale_log2, UNIT, G, CAUSAL, INT64, DOT_PREC)
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + base_dq + _row_offsets(rows, sdqn, INT64)[:, None] + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _dkdv_step(e, toff, kk, vv, dk, dv, kpos, Q, DO, LSE, DELTA, bq_h, bdo_h, bl_h,
               T_UNITS, T_BITS, sqn, sqd, sdon, sdod, sln, qs, nq, slot, within, offs_m,
               offs_d, d_ok, sub_r, sm_scale, sm_scale_log2,
               UNIT: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               VARLEN: tl.constexpr, INT64: tl.constexpr, DOT_PREC: tl.constexpr,
               EVEN_D: tl.constexpr):
    """One step of the dk/dv loop: a group of query units against the key tile."""
    qpos, u_ok = _unit_rows(T_UNITS, toff + e, slot, within, offs_m, UNIT, G)
    qrow = qpos - qs
    q_ok = u_ok & (qrow >= 0) & (qrow < nq)
    q = _load_rows(Q + bq_h + _row_offsets(qrow, sqn, INT64)[:, None] + offs_d[None, :] * sqd,
                   q_ok, d_ok, MASKED or VARLEN, EVEN_D)
    do = _load_rows(DO + bdo_h + _row_offsets(qrow, sdon, INT64)[:, None] + offs_d[None, :] * sdod,
                    q_ok, d_ok, MASKED or VARLEN, EVEN_D)
    lse = tl.load(LSE + bl_h + _row_offsets(qrow, sln, INT64), mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bl_h + _row_offsets(qrow, sln, INT64), mask=q_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    st = tl.dot(kk, tl.trans(q), input_precision=DOT_PREC) * sm_scale_log2
    if MASKED:
        bits = tl.load(T_BITS + toff + e + slot)
        mk = (((bits[None, :] >> sub_r[:, None]) & 1) != 0) & q_ok[None, :]
        if CAUSAL:
            mk = mk & (kpos[:, None] <= qpos[None, :])
        st = tl.where(mk, st, float("-inf"))
    elif VARLEN:
        st = tl.where(q_ok[None, :], st, float("-inf"))
    pt = tl.exp2(st - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(vv, tl.trans(do), input_precision=DOT_PREC)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def s2_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    T_UNITS, T_BITS, T_NFULL, T_NTOT, T_SUBS,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdon, sdoh, sdod,
    sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd, slb, slh, sln,
    CU_Q, CU_K, ORDER,
    Nq, Nk, q_start, k_start,
    HKV, KV_GROUP, TAB_GROUP, t0, n_tab_tiles, tab_len, n_first, n_prog_tiles,
    sm_scale, sm_scale_log2,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNIT: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    INT64: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, MASKED_STAGES: tl.constexpr,
    GATHER_K: tl.constexpr, ORDERED: tl.constexpr,
):
    """dk and dv of one key tile. SPLIT runs the unmasked and masked entries as two loops (the
    masked one with MASKED_STAGES pipeline stages) instead of one loop with a branch. GATHER_K:
    the tile's key blocks come from T_SUBS (merged key tiles) instead of being consecutive."""
    pid_n, b, hk = _program_ids(ORDER, n_prog_tiles, HKV, ORDERED)
    q_off, k_off, nq, nk, qs, ks = _seq_geometry(CU_Q, CU_K, b, Nq, Nk, q_start, k_start, VARLEN)
    if VARLEN:
        bq = q_off.to(tl.int64)
        bk = k_off.to(tl.int64)
        base_q = bq * sqn
        base_do = bq * sdon
        base_l = bq * sln
        base_k = bk * skn
        base_v = bk * svn
        base_dk = bk * sdkn
        base_dv = bk * sdvn
    else:
        b64 = b.to(tl.int64)
        base_q = b64 * sqb
        base_do = b64 * sdob
        base_l = b64 * slb
        base_k = b64 * skb
        base_v = b64 * svb
        base_dk = b64 * sdkb
        base_dv = b64 * sdvb
    hk64 = hk.to(tl.int64)
    base_k += hk64 * skh
    base_v += hk64 * svh
    base_dk += hk64 * sdkh
    base_dv += hk64 * sdvh

    n = n_first + pid_n
    sub_r = tl.arange(0, BLOCK_N) // SUB
    if GATHER_K:
        srow = ((hk * KV_GROUP) // TAB_GROUP).to(tl.int64) * n_tab_tiles + n
        kblk = tl.load(T_SUBS + srow * (BLOCK_N // SUB) + sub_r)
        kpos = kblk * SUB + tl.arange(0, BLOCK_N) % SUB
        krow = kpos - ks
        k_ok = (kblk >= 0) & (krow >= 0) & (krow < nk)
        if tl.max(k_ok.to(tl.int32), axis=0) == 0:
            return
    else:
        if (n * BLOCK_N - ks >= nk) | ((n + 1) * BLOCK_N - ks <= 0):
            return
        kpos = n * BLOCK_N + tl.arange(0, BLOCK_N)
        krow = kpos - ks
        k_ok = (krow >= 0) & (krow < nk)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kmask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(K + base_k + _row_offsets(krow, skn, INT64)[:, None] + offs_d[None, :] * skd,
                 mask=kmask, other=0.0)
    vv = tl.load(V + base_v + _row_offsets(krow, svn, INT64)[:, None] + offs_d[None, :] * svd,
                 mask=kmask, other=0.0)

    has_tab = (n >= t0) & (n < t0 + n_tab_tiles)
    ti = tl.where(has_tab, n - t0, 0)

    G: tl.constexpr = BLOCK_M // UNIT
    offs_m = tl.arange(0, BLOCK_M)
    slot = offs_m // UNIT
    within = offs_m % UNIT
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for hh in range(0, KV_GROUP):
        h = hk * KV_GROUP + hh
        h64 = h.to(tl.int64)
        p_head = h // TAB_GROUP
        trow = p_head.to(tl.int64) * n_tab_tiles + ti
        nfull = tl.load(T_NFULL + trow, mask=has_tab, other=0)
        ntot = tl.load(T_NTOT + trow, mask=has_tab, other=0)
        toff = trow * tab_len
        bq_h = base_q + h64 * sqh
        bdo_h = base_do + h64 * sdoh
        bl_h = base_l + h64 * slh
        if SPLIT:
            if nfull > 0:
                for e in range(0, nfull, G):
                    dk, dv = _dkdv_step(
                        e, toff, kk, vv, dk, dv, kpos, Q, DO, LSE, DELTA, bq_h, bdo_h, bl_h,
                        T_UNITS, T_BITS, sqn, sqd, sdon, sdod, sln, qs, nq, slot,
                        within, offs_m, offs_d, d_ok, sub_r, sm_scale, sm_scale_log2, UNIT, G, False,
                        CAUSAL, VARLEN, INT64, DOT_PREC, BLOCK_D == HEAD_D)
            if ntot > nfull:
                for e in tl.range(nfull, ntot, G, num_stages=MASKED_STAGES):
                    dk, dv = _dkdv_step(
                        e, toff, kk, vv, dk, dv, kpos, Q, DO, LSE, DELTA, bq_h, bdo_h, bl_h,
                        T_UNITS, T_BITS, sqn, sqd, sdon, sdod, sln, qs, nq, slot,
                        within, offs_m, offs_d, d_ok, sub_r, sm_scale, sm_scale_log2, UNIT, G, True,
                        CAUSAL, VARLEN, INT64, DOT_PREC, BLOCK_D == HEAD_D)
        else:
            if ntot > 0:
                for e in range(0, ntot, G):
                    if e >= nfull:
                        dk, dv = _dkdv_step(
                            e, toff, kk, vv, dk, dv, kpos, Q, DO, LSE, DELTA, bq_h, bdo_h,
                            bl_h, T_UNITS, T_BITS, sqn, sqd, sdon, sdod, sln, qs,
                            nq, slot, within, offs_m, offs_d, d_ok, sub_r, sm_scale, sm_scale_log2,
                            UNIT, G, True, CAUSAL, VARLEN, INT64, DOT_PREC, BLOCK_D == HEAD_D)
                    else:
                        dk, dv = _dkdv_step(
                            e, toff, kk, vv, dk, dv, kpos, Q, DO, LSE, DELTA, bq_h, bdo_h,
                            bl_h, T_UNITS, T_BITS, sqn, sqd, sdon, sdod, sln, qs,
                            nq, slot, within, offs_m, offs_d, d_ok, sub_r, sm_scale, sm_scale_log2,
                            UNIT, G, False, CAUSAL, VARLEN, INT64, DOT_PREC, BLOCK_D == HEAD_D)

    dk = dk * sm_scale
    tl.store(DK + base_dk + _row_offsets(krow, sdkn, INT64)[:, None] + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + base_dv + _row_offsets(krow, sdvn, INT64)[:, None] + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def s2_bwd_delta_kernel(O, DO, DELTA, sob, son, soh, sod, sdob, sdon, sdoh, sdod, sdb, sdh, sdn,
                        N, H, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """delta[b, h, n] = sum_d O * dO in fp32 (one read of each, no fp32 copies)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod, mask=m, other=0.0)
    g = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=m,
                other=0.0)
    acc = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(DELTA + b * sdb + h * sdh + rows * sdn, acc, mask=rows < N)
