"""Star / Ring / dense engine against Hugging Face's own attention on a tiny random Llama.

Truth: the stock model with transformers' sdpa attention over the whole sequence (dense logits),
and, for Star's phase 1, the reference design (each block re-encoded with its anchor in front).
"Exact" follows DESIGN.md: fp32 logits within 1e-4 * max|logit|.
"""
import pytest
import torch

from starshard.star import StarEngine, plan_blocks, plan_zigzag
from starshard.star import attention as A
from starshard.star.cache import PositionedKV
from starshard.star.launch import run_local
from starshard.star.testing import host_generate, tiny_llama

pytest.importorskip("transformers")

CTX_LEN = 157          # not a multiple of the block sizes or host counts used below
G = torch.Generator().manual_seed(11)
CONTEXT = torch.randint(0, 97, (CTX_LEN,), generator=G)
QUERIES = [torch.randint(0, 97, (5,), generator=G), torch.randint(0, 97, (3,), generator=G)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


def _hf_logits(model, ids):
    """The stock model (sdpa attention, no starshard) over the whole sequence: last logits."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(ids.view(1, -1), use_cache=False).logits[0, -1].float()


def _exact(a, b):
    return (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


def test_dense_engine_matches_stock_model(model):
    eng = StarEngine(model, method="dense")
    eng.encode(CONTEXT)
    got = eng.generate(QUERIES[0], 3, return_logits=True)
    ref = _hf_logits(model, torch.cat([CONTEXT, QUERIES[0]]))
    assert _exact(got.logits[0], ref)
    # the greedy continuation equals the stock model's greedy continuation
    seq = torch.cat([CONTEXT, QUERIES[0]])
    for tok in got.tokens:
        nxt = int(_hf_logits(model, seq).argmax())
        assert nxt == tok
        seq = torch.cat([seq, torch.tensor([tok])])


@pytest.mark.parametrize("hosts", [1, 3])
def test_star_with_one_block_equals_dense(model, hosts):
    dense = StarEngine(model, method="dense")
    dense.encode(CONTEXT)
    star = StarEngine(model, method="star", block_size=CTX_LEN, simulate=hosts)
    with pytest.warns(UserWarning, match="stay idle") if hosts > 1 else _nullcontext():
        star.encode(CONTEXT)
    for q in QUERIES:
        a = dense.generate(q, 4, return_logits=True)
        b = star.generate(q, 4, return_logits=True)
        assert a.tokens == b.tokens
        assert _exact(b.logits[0], a.logits[0])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_ring_simulated_equals_stock_model(model, hosts):
    eng = StarEngine(model, method="ring", simulate=hosts)
    eng.encode(CONTEXT)
    got = eng.generate(QUERIES[0], 2, return_logits=True)
    assert _exact(got.logits[0], _hf_logits(model, torch.cat([CONTEXT, QUERIES[0]])))


def test_phase2_merge_over_hosts_equals_dense_attention():
    """Query mode over several caches (disjoint positions) == one dense softmax over all KV."""
    torch.manual_seed(0)
    b, h, hkv, d, n_ctx, n_q = 1, 4, 2, 16, 70, 6
    k = torch.randn(b, n_ctx + n_q, hkv, d)
    v = torch.randn(b, n_ctx + n_q, hkv, d)
    q = torch.randn(b, n_q, h, d)
    caches = [PositionedKV() for _ in range(3)]
    for cache, (s, e) in zip(caches, [(0, 23), (23, 50), (50, 70)]):
        cache.append(0, s, k[:, s:e], v[:, s:e])
    own = PositionedKV()

    class M:
        layer_idx = 0

    step = A.Step("query", start=n_ctx, caches=caches, own=own)
    with A.use_step(step):
        out, _ = A.star_attention(M(), q.transpose(1, 2), k[:, n_ctx:].transpose(1, 2),
                                  v[:, n_ctx:].transpose(1, 2), scaling=d ** -0.5)
    # dense reference: every query sees the whole context and the earlier query tokens
    kk = k.repeat_interleave(h // hkv, 2).transpose(1, 2)
    vv = v.repeat_interleave(h // hkv, 2).transpose(1, 2)
    s = torch.einsum("bhqd,bhkd->bhqk", q.transpose(1, 2), kk) * d ** -0.5
    qpos = torch.arange(n_ctx, n_ctx + n_q)[:, None]
    s = s.masked_fill(torch.arange(n_ctx + n_q)[None, :] > qpos, float("-inf"))
    ref = torch.einsum("bhqk,bhkd->bqhd", torch.softmax(s, -1), vv)
    assert _exact(out, ref)
    assert own.num_tokens(0) == n_q  # the query host kept the query's KV


def _blockwise_reference_cache(model, block, anchor):
    """The reference design: each block encoded with the anchor tokens in front, anchor dropped."""
    model.set_attn_implementation("sdpa")
    layers = model.config.num_hidden_layers
    ks = {l: [] for l in range(layers)}
    vs = {l: [] for l in range(layers)}
    for s in range(0, CTX_LEN, block):
        e = min(s + block, CTX_LEN)
        if s == 0:
            ids, pos, drop = CONTEXT[:e], torch.arange(0, e), 0
        else:
            ids = torch.cat([CONTEXT[:anchor], CONTEXT[s:e]])
            pos = torch.cat([torch.arange(anchor), torch.arange(s, e)])
            drop = anchor
        with torch.no_grad():
            out = model(ids[None], position_ids=pos[None], use_cache=True)
        for l in range(layers):
            layer = out.past_key_values.layers[l]
            ks[l].append(layer.keys[:, :, drop:].transpose(1, 2))
            vs[l].append(layer.values[:, :, drop:].transpose(1, 2))
    return {l: (torch.cat(ks[l], 1), torch.cat(vs[l], 1)) for l in range(layers)}


def _engine_cache(eng):
    merged = {}
    for layer in range(2):
        segs = sorted(s for c in eng.caches.values() for s in c.segments(layer))
        merged[layer] = (torch.cat([k for _, k, _ in segs], 1), torch.cat([v for _, _, v in segs], 1))
        pos = torch.cat([torch.arange(s, s + k.shape[1]) for s, k, _ in segs])
        assert torch.equal(pos, torch.arange(CTX_LEN))  # every context token once, no padding
    return merged


@pytest.mark.parametrize("block,anchor", [(40, 40), (50, 13), (64, 0)])
def test_phase1_matches_reference_design_and_ignores_host_count(model, block, anchor):
    ref = _blockwise_reference_cache(model, block, anchor)
    first = None
    for hosts in (1, 2, 4):
        eng = StarEngine(model, method="star", block_size=block, anchor_size=anchor, simulate=hosts)
        eng.encode(CONTEXT)
        got = _engine_cache(eng)
        for layer, (k, v) in got.items():
            assert _exact(k, ref[layer][0]) and _exact(v, ref[layer][1])
            if first is not None:  # identical whatever the number of hosts
                assert torch.equal(k, first[layer][0]) and torch.equal(v, first[layer][1])
        first = got


def test_encode_once_ask_many(model):
    eng = StarEngine(model, method="star", block_size=50, simulate=2)
    eng.encode(CONTEXT)
    sizes = {r: c.num_tokens(0) for r, c in eng.caches.items()}
    answers = [eng.generate(q, 3, return_logits=True) for q in QUERIES]
    assert {r: c.num_tokens(0) for r, c in eng.caches.items()} == sizes  # queries left no KV
    for q, a in zip(QUERIES, answers):
        fresh = StarEngine(model, method="star", block_size=50, simulate=2)
        fresh.encode(CONTEXT)
        b = fresh.generate(q, 3, return_logits=True)
        assert a.tokens == b.tokens and torch.equal(a.logits[0], b.logits[0])


def test_stop_conditions(model):
    eng = StarEngine(model, method="dense")
    eng.encode(CONTEXT)
    free = eng.generate(QUERIES[0], 6)
    assert free.stopped_by == "length" and len(free.tokens) == 6
    eos = eng.generate(QUERIES[0], 6, eos_token_id=free.tokens[2])
    assert eos.stopped_by == "eos" and eos.tokens == free.tokens[:2]
    stop = eng.generate(QUERIES[0], 6, stop=lambda toks: len(toks) == 3)
    assert stop.stopped_by == "stop" and stop.tokens == free.tokens[:3]


def test_sampling_is_seeded(model):
    eng = StarEngine(model, method="star", block_size=60, simulate=3)
    eng.encode(CONTEXT)
    a = eng.generate(QUERIES[0], 8, temperature=1.0, top_p=0.9, seed=5)
    b = eng.generate(QUERIES[0], 8, temperature=1.0, top_p=0.9, seed=5)
    c = eng.generate(QUERIES[0], 8, temperature=1.0, top_p=0.9, seed=6)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_plans():
    p = plan_blocks(157, 40, 3)
    assert [tuple((x.start, x.end) for x in ps) for ps in p.pieces] == [((0, 40), (40, 80)), ((80, 120),), ((120, 157),)]
    assert p.query_host == 2
    z = plan_zigzag(157, 2)
    assert sorted((x.start, x.end) for ps in z.pieces for x in ps)[0] == (0, 39)
    assert sum(x.size for ps in z.pieces for x in ps) == 157
    assert abs(z.host_tokens(0) - z.host_tokens(1)) <= 2
    assert z.query_host == 0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="anchor_size"):
        StarEngine(model, block_size=10, anchor_size=11)
    with pytest.raises(ValueError, match="method"):
        StarEngine(model, method="flash")
    eng = StarEngine(model, method="dense")
    with pytest.raises(RuntimeError, match="encode"):
        eng.generate(QUERIES[0], 2)
    with pytest.raises(ValueError, match="maximum position"):
        eng.encode(torch.zeros(5000, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D token ids"):      # a batch is not one context
        eng.encode(torch.zeros(3, 100, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        eng.encode(torch.zeros(100))
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 97\): min 0, max 97"):
        eng.encode(torch.arange(98))
    eng.encode(CONTEXT)
    with pytest.raises(ValueError, match="maximum position"):
        eng.generate(QUERIES[0], 4000)
    with pytest.raises(ValueError, match="min -1"):
        eng.generate([5, -1, 3], 2)
    with pytest.raises(TypeError, match="query_ids must be integer"):
        eng.generate([1.5, 2.0], 2)
    with pytest.raises(ValueError, match="the query is empty"):
        eng.generate([], 2)


def test_unsupported_model_features_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="softcapping"):
        StarEngine(gemma)
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=16))
    with pytest.raises(ValueError, match="sliding"):
        StarEngine(mistral)


# ---- several processes (gloo) -------------------------------------------------------------------

def _dense_answers(model):
    eng = StarEngine(model, method="dense")
    eng.encode(CONTEXT)
    return [eng.generate(q, 3, return_logits=True) for q in QUERIES]


def _spec(method, **kw):
    return dict(method=method, context=CONTEXT.tolist(), queries=[q.tolist() for q in QUERIES],
                max_new_tokens=3, **kw)


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_ring_on_processes_equals_dense(model, hosts):
    ref = _dense_answers(model)
    results = run_local(host_generate, hosts, (_spec("ring"),), timeout=60)
    for res in results:  # every rank returns the same answers
        for (tokens, logits, _), want in zip(res["answers"], ref):
            assert tokens == want.tokens
            assert _exact(logits, want.logits[0])
    held = sorted(p for res in results for p in res["positions"])
    assert held == list(range(CTX_LEN))


def test_star_on_processes_equals_simulated_star(model):
    sim = StarEngine(model, method="star", block_size=40, anchor_size=20, simulate=2)
    sim.encode(CONTEXT)
    want = [sim.generate(q, 3, return_logits=True) for q in QUERIES]
    results = run_local(host_generate, 2, (_spec("star", block_size=40, anchor_size=20),), timeout=60)
    for res in results:
        for (tokens, logits, _), w in zip(res["answers"], want):
            assert tokens == w.tokens
            assert _exact(logits, w.logits[0])
    assert results[0]["query_host"] == 1


def test_sampling_identical_on_every_rank():
    results = run_local(host_generate, 2, (_spec("star", block_size=80, temperature=1.0, top_p=0.95,
                                                 sample_seed=3),), timeout=60)
    assert results[0]["answers"][0][0] == results[1]["answers"][0][0]


def test_streamed_anchor_gives_the_same_cache(model):
    once = StarEngine(model, method="star", block_size=40, anchor_size=25, simulate=3)
    once.encode(CONTEXT)
    stream = StarEngine(model, method="star", block_size=40, anchor_size=25, simulate=3,
                        anchor_mode="stream")
    stream.encode(CONTEXT)
    a, b = _engine_cache(once), _engine_cache(stream)
    for layer in a:
        assert torch.equal(a[layer][0], b[layer][0]) and torch.equal(a[layer][1], b[layer][1])


def test_streamed_anchor_on_processes_equals_once(model):
    spec = _spec("star", block_size=40, anchor_size=25)
    once = run_local(host_generate, 3, (spec,), timeout=60)
    stream = run_local(host_generate, 3, (dict(spec, anchor_mode="stream"),), timeout=60)
    for a, b in zip(once, stream):
        for (ta, la, _), (tb, lb, _) in zip(a["answers"], b["answers"]):
            assert ta == tb and _exact(lb, la)


def test_streamed_anchor_with_an_idle_host(model):
    sim = StarEngine(model, method="star", block_size=80, simulate=2)
    sim.encode(CONTEXT)
    want = sim.generate(QUERIES[0], 3, return_logits=True)
    res = run_local(host_generate, 3, (dict(_spec("star", block_size=80, anchor_mode="stream"),
                                            queries=[QUERIES[0].tolist()]),), timeout=60)
    assert res[2]["positions"] == []  # the third host had no block
    for r in res:
        assert r["answers"][0][0] == want.tokens and _exact(r["answers"][0][1], want.logits[0])


def test_a_model_whose_attention_bypasses_the_interface_is_refused(monkeypatch):
    model = tiny_llama(1)
    from transformers.models.llama import modeling_llama

    def own_attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        return torch.zeros_like(hidden_states), None  # never calls the attention interface

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", own_attention)
    with pytest.raises(ValueError, match="cannot be hooked"):
        StarEngine(model)


def test_simulated_hosts_are_charged_the_anchor_they_reuse(model, monkeypatch):
    """Simulated hosts reuse host 0's anchor KV (its first block) and are charged its time; host 0,
    which holds it, is never charged, even when it has a second block."""
    eng = StarEngine(model, method="star", block_size=20, simulate=4)   # 8 blocks, 2 per host
    clock = iter(range(1000))
    monkeypatch.setattr(eng, "_now", lambda: float(next(clock)))
    eng.encode(CONTEXT)
    # host 0: start, block 0 timed (1 s on this clock), end; the others: start, end, + 1 s charged
    assert eng.timings["phase1_s"] == {0: 3.0, 1: 2.0, 2: 2.0, 3: 2.0}
