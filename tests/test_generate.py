"""stablelm.generate against transformers' generate on converted random-weight checkpoints (fp32, CPU): greedy,
stop ids, repetition penalty, min_new_tokens, beam search, input embeddings, sampling filters, streaming, errors,
and transformers' own generate() argument names (max_length, eos_token_id, num_return_sequences, scores, ...)."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import convert_weights
import stablelm
from hf_utils import hf_model
from stablelm.generate import (DecodeSession, GenerateOutput, GenerationConfig, generate, sampling_filters,
                               top_k_filter, top_p_filter)
from stablelm.graph import CUDAGraphBuilder, EagerBuilder

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
    kw.setdefault("pad_token_id", PAD)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, **kw)
    return out[:, ids.shape[1]:]


class CountingBuilder(EagerBuilder):
    """Builds the eager step and counts its calls: stands in for a replacement builder (e.g. a CUDA graph)."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def build(self, run, reset, generators=(), static=()):
        def counted():
            self.calls.append(1)
            return run()
        return counted


def counting_session(model):
    builder = CountingBuilder()
    return DecodeSession(model, builder=builder), builder.calls


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
    session, steps = counting_session(model)
    ours = generate(model, ids, attention_mask=mask, stop_ids=stops, pad_id=PAD, session=session, **kw)
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
def test_default_builder_is_a_cuda_graph_on_cuda_only(pair):
    session = DecodeSession(pair[1])
    assert isinstance(session._builder(GenerationConfig(), torch.device("cuda", 0)), CUDAGraphBuilder)
    assert isinstance(session._builder(GenerationConfig(cuda_graph=False), torch.device("cuda")), EagerBuilder)
    assert isinstance(session._builder(GenerationConfig(), torch.device("cpu")), EagerBuilder)


def test_builder_replaces_the_decode_step(pair):
    _, model = pair
    ids, mask = prompts()
    for kw in (dict(), dict(num_beams=3)):
        session, steps = counting_session(model)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=9, stop_ids=[], session=session, **kw)
        assert torch.equal(out, generate(model, ids, attention_mask=mask, max_new_tokens=9, stop_ids=[], **kw))
        assert len(steps) == 8  # the prefill gives the first token, one step per further token
        assert session.buckets() == [(2 * kw.get("num_beams", 1), 64)]


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
    (dict(sync_every=0), "sync_every"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(output_logits=True), "return_dict_in_generate"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)


def test_bad_generate_inputs(pair):
    _, model = pair
    ids, mask = prompts()
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'; did you mean 'max_new_tokens'"):
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


# ---------------------------------------------------------------- transformers' generate() arguments
def hf_full(hf, ids, mask=None, **kw):
    """transformers' generate() output object (return_dict_in_generate=True)."""
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)


def test_max_length_and_min_length_count_the_prompt(pair):
    hf, model = pair
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
    stop = int(free[0, 1])
    kw = dict(max_length=ids.shape[1] + 15, min_length=ids.shape[1] + 5, eos_token_id=stop, pad_token_id=PAD)
    ours = generate(model, ids, attention_mask=mask, **kw)
    ref = hf_new(hf, ids, mask, **{k: v for k, v in kw.items() if k != "pad_token_id"})
    assert torch.equal(ours, ref) and ours.shape[1] > 2 and not (ours[:, :5] == stop).any()
    assert generate(model, ids, attention_mask=mask, max_length=ids.shape[1] + 7, eos_token_id=None).shape == (2, 7)


@pytest.mark.parametrize("eos", ["int", "list", None])
def test_eos_and_pad_token_id(pair, eos):
    hf, model = pair
    ids, mask = prompts()
    free = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_ids=[])
    eos_id = {"int": int(free[0, 3]), "list": [int(free[0, 2]), int(free[1, 4])], None: None}[eos]
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos_id, pad_token_id=7)
    ref = hf_new(hf, ids, mask, max_new_tokens=20, eos_token_id=eos_id, pad_token_id=7)
    assert torch.equal(ours, ref)
    if eos is None:
        assert torch.equal(ours, free)  # an explicit None stops nowhere, as in transformers
    else:
        row = ours[0].tolist()
        end = min(row.index(s) for s in ([eos_id] if eos == "int" else eos_id) if s in row)
        assert end <= 3 and (ours[0, end + 1:] == 7).all()  # stopped rows are padded with pad_token_id


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_num_return_sequences_with_beams(pair, length_penalty):
    hf, model = pair
    ids, mask = prompts()
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, eos_token_id=BEAM_STOPS,
              length_penalty=length_penalty)
    ours = generate(model, ids, attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True, **kw)
    ref = hf_full(hf, ids, mask, pad_token_id=PAD, output_scores=True, **kw)
    assert isinstance(ours, GenerateOutput) and ours.sequences.shape[0] == 4
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    plain = generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(plain, ours.sequences[:, ids.shape[1]:])


def test_num_return_sequences_with_sampling(pair):
    hf, model = pair
    ids, mask = prompts()
    # top_k=1 sampling is greedy, so each of the n copies must equal transformers' (and each other).
    kw = dict(do_sample=True, top_k=1, num_return_sequences=3, max_new_tokens=10, eos_token_id=None)
    ours = generate(model, ids, attention_mask=mask, seed=0, **kw)
    assert ours.shape == (6, 10)
    assert torch.equal(ours, hf_new(hf, ids, mask, **kw))
    # Real sampling: the copies of a prompt are independent draws, seeded.
    kw = dict(do_sample=True, temperature=1.5, num_return_sequences=3, max_new_tokens=12, eos_token_id=None)
    a = generate(model, ids, attention_mask=mask, seed=4, **kw)
    assert torch.equal(a, generate(model, ids, attention_mask=mask, seed=4, **kw))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[3], a[4])


def test_output_scores_and_logits_match_transformers(pair):
    hf, model = pair
    ids, mask = prompts(pad=(0, 0))  # no padding: transformers' repetition penalty then sees our tokens
    free = generate(model, ids, attention_mask=mask, max_new_tokens=16, stop_ids=[])
    kw = dict(max_new_tokens=16, min_new_tokens=3, repetition_penalty=1.2, eos_token_id=int(free[0, 5]),
              pad_token_id=PAD, output_scores=True, output_logits=True)
    ours = generate(model, ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    ref = hf_full(hf, ids, mask, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert len(ours.scores) == len(ref.scores) == len(ours.logits) == ours.sequences.shape[1] - ids.shape[1]
    for a, b in zip(ours.scores + ours.logits, ref.scores + ref.logits):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    assert torch.isinf(ours.scores[0]).any()  # min_new_tokens blocked the stop id
    # Sampling: step 0's scores are the warped ones (temperature -> top-k -> top-p), as in transformers.
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=3, eos_token_id=None,
              output_scores=True)
    ours = generate(model, ids, attention_mask=mask, return_dict_in_generate=True, seed=1, **kw)
    ref = hf_full(hf, ids, mask, **kw)
    torch.testing.assert_close(ours.scores[0], ref.scores[0], rtol=1e-4, atol=1e-4)
    assert torch.isinf(ours.scores[0]).sum() > 0


def test_inputs_embeds_alias(pair):
    _, model = pair
    ids, mask = prompts()
    embeds = model.embed(ids).detach()
    assert torch.equal(generate(model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8),
                       generate(model, input_embeds=embeds, attention_mask=mask, max_new_tokens=8))


@pytest.mark.parametrize("kw,error,match", [
    (dict(no_repeat_ngram_size=3), TypeError, "does not support transformers' argument 'no_repeat_ngram_size'"),
    (dict(generation_config=object()), TypeError, "generation_config.*config=stablelm.generate.GenerationConfig"),
    (dict(stopping_criteria=[]), TypeError, "'stopping_criteria'.*eos_token_id"),
    (dict(output_attentions=True), TypeError, "output_attentions"),
    (dict(max_lenght=30), TypeError, "unexpected keyword argument 'max_lenght'; did you mean 'max_length'"),
    (dict(max_length=30, max_new_tokens=5), TypeError, "max_new_tokens or max_length"),
    (dict(eos_token_id=2, stop_ids=[2]), TypeError, "stop_ids or transformers' eos_token_id"),
    (dict(max_length=10), ValueError, "max_length=10 leaves no room"),
    (dict(max_length=12.0), ValueError, "max_length=12.0 must be an integer"),
    (dict(use_cache=False), ValueError, "use_cache=False"),
    (dict(output_scores=True), ValueError, "output_scores.*return_dict_in_generate=True"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences.*greedy"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences.*<= num_beams=2"),
    (dict(num_beams=2, return_dict_in_generate=True, output_scores=True), ValueError, "sequences_scores"),
    (dict(eos_token_id=[96]), ValueError, "stop_ids.*outside"),
])
def test_transformers_arguments_not_supported_are_errors(pair, kw, error, match):
    _, model = pair
    ids, mask = prompts()
    with pytest.raises(error, match=match):
        generate(model, ids, attention_mask=mask, **kw)
