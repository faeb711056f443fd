"""stablelm.generate against transformers' generate on converted random-weight checkpoints (fp32, CPU): greedy,
stop ids, repetition penalty, min_new_tokens, beam search, input embeddings, sampling filters, streaming, errors."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import convert_weights
import stablelm
from hf_utils import hf_model
from stablelm.generate import (DecodeStep, GenerationConfig, default_step_factory, generate, sampling_filters,
                               top_k_filter, top_p_filter)
from stablelm.graph import GraphDecodeStep

PAD = 1  # hf_utils' vocabulary: bos 1, eos 2; left padding and finished rows use 1 here


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, the same weights converted and loaded as stablelm)."""
    tmp = tmp_path_factory.mktemp("generate")
    hf = hf_model()
    hf.save_pretrained(tmp / "hf")
    convert_weights.main([str(tmp / "hf"), str(tmp / "converted")])
    return hf, stablelm.load(tmp / "converted")


def prompts(batch=2, length=10, pad=(4, 0), seed=1):
    """Random prompts [batch, length], row i left padded by pad[i]."""
    ids = torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad[:batch]):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_new(hf, ids, mask=None, **kw):
    """transformers' new tokens (greedy / beam unless told otherwise)."""
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:]


steps = []  # token shapes seen by CountingStep


class CountingStep(DecodeStep):
    """The eager step, recording each call: stands in for a replacement step (e.g. a CUDA graph)."""

    def __call__(self, tokens):
        steps.append(tuple(tokens.shape))
        return super().__call__(tokens)


# ---------------------------------------------------------------- greedy, stop ids, penalties
@pytest.mark.parametrize("batch", [2, 1])
def test_greedy_matches_transformers(pair, batch):
    hf, model = pair
    ids, mask = prompts(batch)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=32, stop_ids=[])
    ref = hf_new(hf, ids, mask, max_new_tokens=32, eos_token_id=None)
    assert ours.shape == (batch, 32)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_chunked_prefill_generates_the_same_tokens(pair, num_beams):
    """Prompts written into the cache 3 tokens at a time (row 0 padded past the first piece) give the
    tokens transformers gives for the whole prompt."""
    hf, model = pair
    ids, mask = prompts(2, length=12, pad=(5, 0))
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=16, stop_ids=[], num_beams=num_beams,
                    prefill_chunk=3)
    ref = hf_new(hf, ids, mask, max_new_tokens=16, eos_token_id=None, num_beams=num_beams)
    assert torch.equal(ours, ref)


def test_stop_ids_end_rows_and_pad_the_rest(pair):
    hf, model = pair
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=24, stop_ids=[])
    stop = int(free[0, 3])  # row 0 reaches it at step 3 at the latest
    streamed = []
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=24, stop_ids=[stop], pad_id=PAD,
                    streamer=streamed.append)
    assert torch.equal(ours, hf_new(hf, ids, mask, max_new_tokens=24, eos_token_id=stop))
    end = ours[0].tolist().index(stop)
    assert end <= 3 and (ours[0, end + 1:] == PAD).all() and ours.shape[1] > end + 1
    # Before stopping, rows are untouched by the stop id; streaming saw every step's tokens in order.
    assert torch.equal(ours[0, :end + 1], free[0, :end + 1])
    assert torch.equal(torch.stack(streamed, dim=1), ours)


def test_generation_ends_when_every_row_stopped(pair):
    _, model = pair
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=16, stop_ids=[])
    stops = [int(free[0, 2]), int(free[1, 5])]
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=16, stop_ids=stops, pad_id=PAD)
    # Each row runs as without stop ids up to its first stop id; the batch ends with the last row to stop.
    first_stop = [min(row.index(s) for s in stops if s in row) for row in free.tolist()]
    assert max(first_stop) <= 5
    assert ours.shape[1] == max(first_stop) + 1
    for row, end in enumerate(first_stop):
        assert torch.equal(ours[row, :end + 1], free[row, :end + 1]) and (ours[row, end + 1:] == PAD).all()


def test_repetition_penalty_matches_transformers(pair):
    hf, model = pair
    ids, _ = prompts(batch=1, pad=(0,))
    ours = generate(model, ids, max_new_tokens=24, repetition_penalty=1.3, stop_ids=[])
    assert torch.equal(ours, hf_new(hf, ids, max_new_tokens=24, repetition_penalty=1.3, eos_token_id=None))
    assert not torch.equal(ours, generate(model, ids, max_new_tokens=24, stop_ids=[]))
    # Penalties below 1 reward repeats: the other branch of the rule.
    assert torch.equal(generate(model, ids, max_new_tokens=24, repetition_penalty=0.7, stop_ids=[]),
                       hf_new(hf, ids, max_new_tokens=24, repetition_penalty=0.7, eos_token_id=None))


def test_repetition_penalty_ignores_left_padding(pair):
    """Each row of a padded batch equals transformers on that prompt alone (transformers' own batch would also
    penalise the padding id)."""
    hf, model = pair
    ids, mask = prompts()
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=1.3, stop_ids=[])
    for row in range(2):
        real = ids[row:row + 1, mask[row].bool()]
        ref = hf_new(hf, real, max_new_tokens=20, repetition_penalty=1.3, eos_token_id=None)
        assert torch.equal(ours[row:row + 1], ref)


def test_min_new_tokens_matches_transformers(pair):
    hf, model = pair
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
    stop = int(free[0, 1])
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=6, stop_ids=[stop],
                    pad_id=PAD)
    assert torch.equal(ours, hf_new(hf, ids, mask, max_new_tokens=20, min_new_tokens=6, eos_token_id=stop))
    assert not (ours[:, :6] == stop).any()
    assert ours.shape[1] > 2  # without min_new_tokens row 0 would have stopped at step 1


# ---------------------------------------------------------------- beam search
BEAM_STOPS = [2, 63]


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (1.0, True), (2.0, False), (2.0, True),
                                                           (-0.5, "never"), (2.0, "never")])
def test_beam_search_matches_transformers(pair, length_penalty, early_stopping):
    hf, model = pair
    ids, mask = prompts()
    kw = dict(num_beams=3, max_new_tokens=20, length_penalty=length_penalty, early_stopping=early_stopping)
    ours = generate(model, ids, attention_mask=mask, stop_ids=BEAM_STOPS, pad_id=PAD, **kw)
    ref = hf_new(hf, ids, mask, eos_token_id=BEAM_STOPS, **kw)
    assert ours.shape == ref.shape and torch.equal(ours, ref)


@pytest.mark.parametrize("length_penalty,early_stopping", [(2.0, False), (2.0, "never"), (1.0, True), (-1.0, False)])
def test_beam_search_with_many_stop_ids_matches_transformers(pair, length_penalty, early_stopping):
    """With 37 stop ids candidates stop at nearly every step: this exercises keeping (1 + #stops) * beams
    candidates, the "cannot improve any more" masking of one input while the other runs on, and the "never"
    length heuristic."""
    hf, model = pair
    ids, mask = prompts()
    stops = list(range(3, 40))
    kw = dict(num_beams=3, max_new_tokens=16, length_penalty=length_penalty, early_stopping=early_stopping)
    steps.clear()
    ours = generate(model, ids, attention_mask=mask, stop_ids=stops, pad_id=PAD, step_factory=CountingStep, **kw)
    forwards = []
    hook = hf.register_forward_hook(lambda *_: forwards.append(1))
    try:
        ref = hf_new(hf, ids, mask, eos_token_id=stops, **kw)
    finally:
        hook.remove()
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    assert 1 + len(steps) == len(forwards)  # the loop also ends as early (prefill + steps = its forwards)


def test_beam_search_stop_ids_and_early_stopping_matter(pair):
    """The cases above really exercise finished beams: a stop id ends the best beam with length penalty 1, and
    early_stopping changes the result with length penalty 2."""
    _, model = pair
    ids, mask = prompts()
    kw = dict(num_beams=3, max_new_tokens=20, stop_ids=BEAM_STOPS, pad_id=PAD)
    plain = generate(model, ids, attention_mask=mask, length_penalty=1.0, **kw)
    assert any(s in row for row in plain.tolist() for s in BEAM_STOPS)
    eager_stop = generate(model, ids, attention_mask=mask, length_penalty=2.0, early_stopping=True, **kw)
    patient = generate(model, ids, attention_mask=mask, length_penalty=2.0, early_stopping=False, **kw)
    assert not torch.equal(eager_stop, patient)


def test_beam_search_penalties_match_transformers(pair):
    hf, model = pair
    ids, mask = prompts(pad=(0, 0))  # no padding: transformers' penalty then sees the same tokens as ours
    kw = dict(num_beams=3, max_new_tokens=16, repetition_penalty=1.3, min_new_tokens=5)
    ours = generate(model, ids, attention_mask=mask, stop_ids=BEAM_STOPS, pad_id=PAD, **kw)
    assert torch.equal(ours, hf_new(hf, ids, mask, eos_token_id=BEAM_STOPS, **kw))


# ---------------------------------------------------------------- input embeddings
def test_input_embeds_equal_ids(pair):
    _, model = pair
    ids, mask = prompts()
    embeds = model.embed(ids).detach()
    for kw in (dict(max_new_tokens=16), dict(max_new_tokens=12, num_beams=3)):
        from_ids = generate(model, ids, attention_mask=mask, stop_ids=BEAM_STOPS, pad_id=PAD, **kw)
        from_embeds = generate(model, input_embeds=embeds, attention_mask=mask, stop_ids=BEAM_STOPS, pad_id=PAD,
                               **kw)
        assert torch.equal(from_ids, from_embeds)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_input_embeds_penalise_generated_tokens_only(pair):
    hf, model = pair
    ids, mask = prompts(batch=1, pad=(0,))
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=hf.model.embed_tokens(ids), attention_mask=mask, max_new_tokens=20,
                          repetition_penalty=1.3, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    ours = generate(model, input_embeds=model.embed(ids).detach(), attention_mask=mask, max_new_tokens=20,
                    repetition_penalty=1.3, stop_ids=[])
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, generate(model, ids, max_new_tokens=20, repetition_penalty=1.3, stop_ids=[]))


# ---------------------------------------------------------------- sampling
def test_sampling_is_seeded(pair):
    _, model = pair
    ids, mask = prompts()
    kw = dict(do_sample=True, temperature=1.3, max_new_tokens=24, stop_ids=[])
    a = generate(model, ids, attention_mask=mask, seed=7, **kw)
    assert torch.equal(a, generate(model, ids, attention_mask=mask, seed=7, **kw))
    assert not torch.equal(a, generate(model, ids, attention_mask=mask, seed=8, **kw))


def test_top_k_one_is_greedy(pair):
    _, model = pair
    ids, mask = prompts()
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
    sampled = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[], do_sample=True,
                       temperature=0.7, top_k=1, seed=3)
    assert torch.equal(sampled, greedy)


def test_sampled_tokens_stay_in_the_top_k(pair):
    """Each sampled token is among the k best of the logits a full (uncached) forward gives at its position."""
    _, model = pair
    ids, _ = prompts(batch=2, pad=(0, 0))
    out = generate(model, ids, max_new_tokens=20, stop_ids=[], do_sample=True, top_k=3, seed=0)
    with torch.no_grad():
        logits = model(torch.cat([ids, out], dim=1))[:, ids.shape[1] - 1:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[..., None]).any(-1).all()
    assert (top3[..., 0] != out).any()  # and it does not just pick the best


def test_filters_match_transformers_warpers():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g) * 3
    scores[0, :4] = scores[0].max()  # ties at the top
    scores[1, 10:20] = 0.25  # a plateau at the top-k / top-p boundary
    scores[2, :] = 1.0  # uniform
    for k in (1, 3, 5, 11, 50, 80):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores)), k
    for p in (0.01, 0.3, 0.6, 0.9, 0.999):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores)), p
    # The whole chain, in transformers' order: same scores, so the same sampling distribution.
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8)
    ref = scores
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = warper(None, ref)
    ours = sampling_filters(scores, cfg)
    assert torch.equal(ours, ref)
    kept = torch.isfinite(ours).sum(-1)
    assert (kept >= 1).all() and (kept < 50).all()


# ---------------------------------------------------------------- the decode-step seam
def test_default_step_is_a_cuda_graph_on_cuda_only():
    on = GenerationConfig()
    off = GenerationConfig(cuda_graph=False)
    assert default_step_factory(torch.device("cuda", 0), on) is GraphDecodeStep
    assert default_step_factory("cuda", off) is DecodeStep
    assert default_step_factory("cpu", on) is DecodeStep


def test_step_factory_replaces_the_decode_step(pair):
    _, model = pair
    ids, mask = prompts()
    for kw, rows in ((dict(), 2), (dict(num_beams=3), 6)):
        steps.clear()
        out = generate(model, ids, attention_mask=mask, max_new_tokens=9, stop_ids=[], step_factory=CountingStep,
                       **kw)
        assert torch.equal(out, generate(model, ids, attention_mask=mask, max_new_tokens=9, stop_ids=[], **kw))
        assert steps == [(rows, 1)] * 8  # the prefill gives the first token, one step per further token


@pytest.mark.gpu
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cuda_graph_step_matches_eager(num_beams):
    """generate's default on CUDA (the decode step replayed from a CUDA graph) gives the eager step's tokens."""
    model = stablelm.StableLM.random(stablelm.preset("tiny", num_key_value_heads=2), device="cuda")
    ids = torch.randint(1, 512, (3, 17), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = dict(attention_mask=mask, max_new_tokens=40, num_beams=num_beams, stop_ids=[])
    eager = generate(model, ids, cuda_graph=False, **kw)
    assert torch.equal(generate(model, ids, **kw), eager)


# ---------------------------------------------------------------- errors
def test_prompt_too_long_is_a_clear_error(pair):
    _, model = pair
    ids = torch.randint(3, 96, (1, 60))
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ max_new_tokens=10 does not fit"):
        generate(model, ids, max_new_tokens=10)
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, ids[:, :58], max_new_tokens=10, num_beams=3)
    assert generate(model, ids, max_new_tokens=4, stop_ids=[]).shape == (1, 4)  # 64 fits exactly


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(temperature=0.7), "do_sample=True"),
    (dict(top_k=5), "do_sample=True"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "num_beams"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(stop_ids=[-1]), "stop_ids"),
    (dict(pad_id=-2), "pad_id"),
    (dict(seed=1.5), "seed"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(prefill_chunk=2.0), "prefill_chunk"),
    (dict(cuda_graph=1), "cuda_graph"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)


def test_bad_generate_inputs(pair):
    _, model = pair
    ids, mask = prompts()
    with pytest.raises(ValueError, match="unknown generation options \\['max_tokens'\\]"):
        generate(model, ids, max_tokens=3)
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, ids, input_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        generate(model)
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids, attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, ids + 90)
    with pytest.raises(ValueError, match="integer tensor"):
        generate(model, ids.float())
    with pytest.raises(ValueError, match="empty"):
        generate(model, ids[:, :0])
    with pytest.raises(ValueError, match="stop_ids"):
        generate(model, ids, stop_ids=[96])
    with pytest.raises(ValueError, match="streaming needs num_beams=1"):
        generate(model, ids, num_beams=2, streamer=print)
    with pytest.raises(ValueError, match="input_embeds must be"):
        generate(model, input_embeds=torch.randn(2, 64))
