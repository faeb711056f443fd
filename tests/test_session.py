"""DecodeSession: caches and recorded steps reused across generate() calls, rebuilt when the ops choice or the
weights change; on-device early stop equal to per-token stopping; non-finite logits stop with an error.

On the CPU the steps run eagerly through the same session code (the builder is the only difference), and
`session.builds` counts what a CUDA graph would have captured. The @gpu tests check the graphs themselves."""
import gc
import weakref

import pytest
import torch

import convert_weights
import stablelm
import stablelm.ops as ops
from hf_utils import hf_model
from stablelm.generate import DecodeSession, NonFiniteLogitsError, default_session, generate
from stablelm.graph import CompileBuilder, EagerBuilder

PAD = 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session")
    hf = hf_model(seed=3)
    hf.save_pretrained(tmp / "hf")
    convert_weights.main([str(tmp / "hf"), str(tmp / "converted")])
    return hf, stablelm.load(tmp / "converted")


def prompts(batch=2, length=10, pad=(4, 0), seed=None):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    ids = torch.randint(3, 96, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad[:batch]):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_new(hf, ids, mask=None, **kw):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:]


class Counting(EagerBuilder):
    """The eager builder counting the steps run, to see how many decode steps a call took."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def build(self, run, reset, generators=(), static=()):
        def counted():
            self.calls += 1
            return run()
        return counted


def test_second_call_reuses_the_cache_and_step(pair):
    hf, model = pair
    session = DecodeSession(model, bucket=32)
    shapes = [(10, 24, 1), (7, 30, 1), (12, 20, 1), (9, 16, 3), (11, 12, 3)]  # prompt, new tokens, beams
    for i, (length, new, beams) in enumerate(shapes + shapes):
        ids, mask = prompts(length=length, pad=(3, 0))
        kw = dict(max_new_tokens=new, num_beams=beams)
        ours = session.generate(ids, attention_mask=mask, stop_ids=[], **kw)
        assert torch.equal(ours, hf_new(hf, ids, mask, eos_token_id=None, **kw)), i
    # Totals 34 and 37 share the 64-slot bucket, 32 / 25 / 23 the 32-slot one (batch 2, and 2 x 3 beams): one
    # recording each, and the second round of calls recorded nothing.
    assert session.buckets() == [(2, 64), (2, 32), (6, 32)]
    assert session.builds == 3
    # Stop ids, pad id and min_new_tokens live in device buffers and change without a new recording (only
    # switching the stop-id block of min_new_tokens on is a new step).
    ids, mask = prompts(length=30)
    session.generate(ids, attention_mask=mask, max_new_tokens=30, stop_ids=[5, 9], pad_id=3, min_new_tokens=2)
    session.generate(ids, attention_mask=mask, max_new_tokens=30, stop_ids=[5, 9], pad_id=3, min_new_tokens=9)
    session.generate(ids, attention_mask=mask, max_new_tokens=30, stop_ids=[7], pad_id=4)
    assert session.builds == 4


def test_selection_settings_are_part_of_the_key(pair):
    _, model = pair
    session = DecodeSession(model)
    ids, mask = prompts()
    session.generate(ids, attention_mask=mask, max_new_tokens=8, stop_ids=[])
    session.generate(ids, attention_mask=mask, max_new_tokens=8, stop_ids=[], repetition_penalty=1.3)
    session.generate(ids, attention_mask=mask, max_new_tokens=8, stop_ids=[], do_sample=True, top_k=5, seed=0)
    session.generate(ids, attention_mask=mask, max_new_tokens=8, stop_ids=[], do_sample=True, top_k=5, seed=1)
    assert session.builds == 3


def test_ops_use_after_a_call_takes_effect(pair):
    """A recorded step holds the implementations chosen when it was recorded: switching an op must build anew
    (and run the new implementation), switching back reuses the first recording."""
    hf, model = pair
    session = DecodeSession(model)
    ids, mask = prompts()
    first = session.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=[])
    calls = []
    reference = ops.implementation("layer_norm", "torch")

    def counted(*args, **kw):
        calls.append(1)
        return reference(*args, **kw)
    ops.register("layer_norm", "counted", counted)
    try:
        with ops.using(layer_norm="counted"):
            again = session.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=[])
        assert session.builds == 2 and calls  # the new choice ran
        assert torch.equal(again, first)
        n = len(calls)
        back = session.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=[])
        assert session.builds == 2 and len(calls) == n and torch.equal(back, first)
        # Re-registering a name with another function counts as a change too.
        ops.register("layer_norm", "counted", lambda *a, **k: reference(*a, **k))
        with ops.using(layer_norm="counted"):
            session.generate(ids, attention_mask=mask, max_new_tokens=12, stop_ids=[])
        assert session.builds == 3
    finally:
        ops.register("layer_norm", "counted", reference)


def test_replaced_weights_rebuild(pair):
    hf, model = pair
    session = DecodeSession(model)
    ids, mask = prompts()
    before = session.generate(ids, attention_mask=mask, max_new_tokens=10, stop_ids=[])
    old = model.lm_head.weight
    try:
        model.lm_head.weight = torch.nn.Parameter(old.detach().clone())  # same values, new storage
        assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=10, stop_ids=[]), before)
        assert session.builds == 2
    finally:
        model.lm_head.weight = old


@pytest.mark.parametrize("sync_every", [1, 3, 8, 64])
def test_early_stop_equals_per_token_stopping(pair, sync_every):
    """Rows stop at their first stop id and the call ends when the last row stopped, whatever the flag-read
    period; streaming (flags read every step) and transformers agree; steps run past the end are bounded."""
    hf, model = pair
    ids, mask = prompts(seed=11)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=40, stop_ids=[])
    stops = [int(free[0, 4]), int(free[1, 9])]
    builder = Counting()
    session = DecodeSession(model, builder=builder)
    kw = dict(max_new_tokens=40, stop_ids=stops, pad_id=PAD)
    ours = session.generate(ids, attention_mask=mask, sync_every=sync_every, **kw)
    end = max(min(row.index(s) for s in stops if s in row) for row in free.tolist())
    assert ours.shape[1] == end + 1 < 40
    assert torch.equal(ours, hf_new(hf, ids, mask, max_new_tokens=40, eos_token_id=stops))
    assert end <= builder.calls <= min(39, end + 2 * sync_every)
    streamed = []
    assert torch.equal(session.generate(ids, attention_mask=mask, streamer=streamed.append, **kw), ours)
    assert torch.equal(torch.stack(streamed, 1), ours)


def test_min_new_tokens_and_penalty_on_the_device_match_transformers(pair):
    hf, model = pair
    ids, mask = prompts(pad=(0, 0), seed=5)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
    stop = int(free[1, 1])
    kw = dict(max_new_tokens=20, min_new_tokens=6, repetition_penalty=1.4)
    for sync_every in (1, 5):
        ours = generate(model, ids, attention_mask=mask, stop_ids=[stop], pad_id=PAD, sync_every=sync_every, **kw)
        assert torch.equal(ours, hf_new(hf, ids, mask, eos_token_id=stop, **kw))


def test_sampling_is_seeded_across_calls_and_sessions(pair):
    _, model = pair
    ids, mask = prompts()
    kw = dict(do_sample=True, temperature=1.2, top_p=0.95, max_new_tokens=20, stop_ids=[], seed=9)
    a = DecodeSession(model).generate(ids, attention_mask=mask, **kw)
    session = DecodeSession(model)
    for _ in range(2):
        assert torch.equal(session.generate(ids, attention_mask=mask, **kw), a)
    assert not torch.equal(session.generate(ids, attention_mask=mask, **{**kw, "seed": 10}), a)


def test_non_finite_logits_raise(pair):
    """NaN from the first step (broken weights) and inf appearing mid-way both stop with an error naming the
    step, read at the periodic flag check (no per-token host read)."""
    _, model = pair
    ids, mask = prompts()
    old = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[5, 0] = float("nan")
        with pytest.raises(NonFiniteLogitsError, match="at new token 0 in batch rows \\[0, 1\\]"):
            generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
        with pytest.raises(NonFiniteLogitsError, match="at new token 0"):
            generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[], num_beams=2)
        with pytest.raises(NonFiniteLogitsError):
            generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[], do_sample=True, seed=0)
    finally:
        model.lm_head.weight.data.copy_(old)

    calls = []
    reference = ops.implementation("swiglu", "torch")

    def overflowing(gate, up):
        calls.append(1)
        out = reference(gate, up)
        # From the 7th forward on (2 layers per forward), row 1 overflows.
        return out.index_fill(0, torch.tensor([1]), float("inf")) if len(calls) > 12 else out
    ops.register("swiglu", "overflowing", overflowing)
    builder = Counting()
    try:
        with ops.using(swiglu="overflowing"):
            with pytest.raises(NonFiniteLogitsError, match="at new token 6 in batch rows \\[1\\]"):
                DecodeSession(model, builder=builder).generate(ids, attention_mask=mask, max_new_tokens=30,
                                                               stop_ids=[], sync_every=4)
        assert builder.calls < 29  # stopped at a flag check, not at the end
    finally:
        ops.register("swiglu", "overflowing", reference)


def test_default_session_goes_with_its_model(pair):
    _, model = pair
    ids, mask = prompts()
    local = stablelm.StableLM.random(model.config)
    generate(local, ids, attention_mask=mask, max_new_tokens=4)
    session = default_session(local)
    assert session.builds == 1 and default_session(local) is session
    generate(local, ids, attention_mask=mask, max_new_tokens=4)
    assert session.builds == 1
    ref = weakref.ref(local)
    del local
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="no longer exists"):
        session.generate(ids)


def test_session_limits(pair):
    _, model = pair
    session = DecodeSession(model, max_buckets=1)
    ids, mask = prompts()
    for batch in (2, 1, 2):
        session.generate(ids[:batch], attention_mask=mask[:batch], max_new_tokens=4)
    assert session.builds == 3 and session.buckets() == [(2, 64)]
    session.clear()
    assert session.buckets() == []
    with pytest.raises(ValueError, match="another model"):
        generate(stablelm.StableLM.random(model.config), ids, session=session, max_new_tokens=4)
    with pytest.raises(ValueError, match="positive"):
        DecodeSession(model, bucket=0)


# ---------------------------------------------------------------- on the GPU: recorded steps
def _cuda_model(dtype=torch.float32):
    return stablelm.StableLM.random(stablelm.preset("tiny", num_key_value_heads=2), device="cuda", dtype=dtype)


def _cuda_prompts(batch=3, length=17):
    ids = torch.randint(1, 512, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    return ids, mask


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.3, min_new_tokens=4), dict(num_beams=3)])
def test_graph_replay_equals_eager_and_second_call_captures_nothing(kw):
    model = _cuda_model()
    ids, mask = _cuda_prompts()
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=40, stop_ids=[], cuda_graph=False, **kw)
    stops = [int(eager[0, 10]), int(eager[2, 20])]
    eager_stop = generate(model, ids, attention_mask=mask, max_new_tokens=40, stop_ids=stops, cuda_graph=False, **kw)
    session = DecodeSession(model)
    assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=40, stop_ids=[], **kw), eager)
    assert session.builds == 1
    ids2, mask2 = _cuda_prompts(length=29)
    session.generate(ids2, attention_mask=mask2, max_new_tokens=40, stop_ids=[], **kw)
    assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=40, stop_ids=stops, **kw),
                       eager_stop)
    assert session.builds == 1


@pytest.mark.gpu
def test_graph_sampling_is_seeded_and_top_k_one_is_greedy():
    model = _cuda_model()
    ids, mask = _cuda_prompts()
    session = DecodeSession(model)
    kw = dict(attention_mask=mask, max_new_tokens=48, stop_ids=[], do_sample=True, temperature=1.3, top_k=50)
    a = session.generate(ids, seed=1, **kw)
    assert torch.equal(session.generate(ids, seed=1, **kw), a)  # the second call replays, same draws
    assert not torch.equal(session.generate(ids, seed=2, **kw), a)
    assert session.builds == 1
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=48, stop_ids=[], cuda_graph=False)
    assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=48, stop_ids=[], do_sample=True,
                                        top_k=1, seed=0), greedy)


@pytest.mark.gpu
def test_graph_ops_change_recaptures_and_non_finite_raises():
    model = _cuda_model(torch.bfloat16)
    ids, mask = _cuda_prompts()
    session = DecodeSession(model)
    session.generate(ids, attention_mask=mask, max_new_tokens=16)
    with ops.using(layer_norm="torch", swiglu="torch"):
        session.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert session.builds == 2
    session.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert session.builds == 2
    with torch.no_grad():
        model.norm.weight[0] = float("nan")  # in place: the recorded step reads it
    with pytest.raises(NonFiniteLogitsError):
        session.generate(ids, attention_mask=mask, max_new_tokens=16, stop_ids=[])


@pytest.mark.gpu
def test_compiled_reference_step_equals_eager():
    """The gpt-fast recipe through the same session: reference ops, decode step under torch.compile."""
    model = _cuda_model()
    ids, mask = _cuda_prompts()
    with ops.using(**{op: "torch" for op in ops.CUDA_PREFERENCE}):
        eager = generate(model, ids, attention_mask=mask, max_new_tokens=24, stop_ids=[], cuda_graph=False)
        session = DecodeSession(model, builder=CompileBuilder())
        assert torch.equal(session.generate(ids, attention_mask=mask, max_new_tokens=24, stop_ids=[]), eager)
        session.generate(ids, attention_mask=mask, max_new_tokens=24, stop_ids=[])
        assert session.builds == 1
        # The compiled step is replayed from one CUDA graph (not launched op by op).
        steps = [step for bucket in session._buckets.values() for step in bucket.steps.values()]
        assert steps and all(isinstance(step.graph, torch.cuda.CUDAGraph) for step in steps)


def test_compiled_decode_step_writes_the_cache_in_place():
    """Inductor (on the CPU here) compiles the recipe's decode step without copying a layer's cache: each layer's
    buffer is its own tensor, written in place. With one [layers, ...] tensor and per-layer views, the write was
    functionalized into a whole-buffer copy, a loop over every cached element (the GPU peer's 8-of-27-ms copies)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from bench.decode import RECIPE_OPS
    cfg = stablelm.preset("tiny")
    model = stablelm.StableLM.random(cfg, seed=0)
    B, T = 2, 40
    cache, eager_cache = model.make_cache(B, T), model.make_cache(B, T)
    ids = torch.randint(0, cfg.vocab_size, (B, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ops.using(**RECIPE_OPS):
        model.prefill(cache, ids)
        model.prefill(eager_cache, ids)
        want = model(ids[:, :1], cache=eager_cache, last_only=True)  # the same step, uncompiled
        for t in cache.buffers():
            torch._dynamo.mark_static_address(t)
        step = torch.compile(lambda tok: model(tok, cache=cache, last_only=True), dynamic=False, fullgraph=True)
        before = [k.clone() for k in cache.k]
        logits, code = run_and_get_code(step, ids[:, :1])
    bounds = {int(n) for n in re.findall(r"static_cast<int64_t>\((\d+)L\)", "\n".join(code))}
    layer = B * cfg.num_key_value_heads * T * cfg.head_dim
    assert bounds and max(bounds) < layer, sorted(bounds)[-4:]
    # ... and the step did write slot 8 of every layer, and nothing else.
    for k, old in zip(cache.k, before):
        assert not torch.equal(k[:, :, 8], old[:, :, 8])
        assert torch.equal(k[:, :, :8], old[:, :, :8]) and torch.equal(k[:, :, 9:], old[:, :, 9:])
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)  # fp32; inductor may reorder sums
    for got, ref in zip(cache.k + cache.v, eager_cache.k + eager_cache.v):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compile_builder_refuses_what_it_cannot_capture(pair):
    with pytest.raises(ValueError, match="inductor's own CUDA graphs"):
        CompileBuilder(mode="reduce-overhead")
    _, model = pair
    ids, mask = prompts()
    session = DecodeSession(model, builder=CompileBuilder(backend="eager"))
    with pytest.raises(ValueError, match="CUDA device"):
        session.generate(ids, attention_mask=mask, max_new_tokens=2)
