"""Parity with transformers' StableLmForCausalLM: convert random-weight checkpoints and compare fp32 logits."""
import pytest
import torch

import convert_weights
import stablelm
from hf_utils import hf_model

VARIANTS = {
    "default": {},
    "qkv_bias": dict(use_qkv_bias=True),
    "qk_layernorm": dict(qk_layernorm=True),
    "parallel_residual": dict(use_parallel_residual=True),
    "gqa": dict(num_key_value_heads=2),
    "rotary_full": dict(partial_rotary_factor=1.0),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "tied": dict(tie_word_embeddings=True),
    "all_options": dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True, num_key_value_heads=2,
                        rope_theta=500.0),
}


def convert(hf, tmp_path, **save_kwargs):
    src, dst = tmp_path / "hf", tmp_path / "converted"
    hf.save_pretrained(src, **save_kwargs)
    convert_weights.main([str(src), str(dst)])
    return stablelm.load(dst)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, tmp_path):
    hf = hf_model(**VARIANTS[variant])
    model = convert(hf, tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("save_kwargs", [dict(max_shard_size="20KB"), dict(safe_serialization=False)],
                         ids=["sharded_safetensors", "bin"])
def test_sharded_and_bin_checkpoints(save_kwargs, tmp_path):
    hf = hf_model(num_key_value_heads=2)
    try:
        model = convert(hf, tmp_path, **save_kwargs)
    except TypeError as e:  # a transformers release without .bin saving
        pytest.skip(str(e))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert ("model.safetensors.index.json" in files) if "max_shard_size" in save_kwargs else True
    ids = torch.randint(0, hf.config.vocab_size, (1, 17))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def left_padded(vocab, length, pads):
    """Random ids [len(pads), length], row i left padded by pads[i] (pad id 0), and their mask."""
    ids = torch.randint(3, vocab, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("variant", ["default", "gqa", "all_options"])
def test_left_padded_batch(variant, tmp_path):
    hf = hf_model(**VARIANTS[variant])
    model = convert(hf, tmp_path)
    ids, mask = left_padded(hf.config.vocab_size, 20, pads=(5, 0, 11))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        out = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() < 1e-4
    # Each padded row equals the same sequence run alone without padding.
    with torch.no_grad():
        alone = model(ids[2:3, 11:])
    assert (out[2, 11:] - alone[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["default", "gqa", "all_options", "rope_linear"])
def test_kv_cache_decode_matches_full_recompute(variant, tmp_path):
    hf = hf_model(**VARIANTS[variant])
    model = convert(hf, tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 30))
    cache = model.make_cache(batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(ids)
        logits = [model(ids[:, :10], cache=cache)]
        for t in range(10, 30):
            logits.append(model(ids[:, t:t + 1], cache=cache))
    stepwise = torch.cat(logits, dim=1)
    assert (stepwise - full).abs().max().item() < 1e-4
    assert cache.host_lengths == [30, 30]


@pytest.mark.parametrize("variant", ["default", "all_options"])
@pytest.mark.parametrize("chunk", [1, 4, 7, None])
def test_chunked_prefill_matches_transformers(variant, chunk, tmp_path):
    """StableLM.prefill in pieces of `chunk` tokens, left-padded rows (one padded past the first piece), then a
    decode step: the last prompt position's and the next token's logits match transformers on the whole prompt."""
    hf = hf_model(**VARIANTS[variant])
    model = convert(hf, tmp_path)
    ids, mask = left_padded(hf.config.vocab_size, 19, pads=(5, 0, 12))
    nxt = torch.randint(3, hf.config.vocab_size, (3, 1))
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.make_cache(batch_size=3, max_len=20)
    with torch.no_grad():
        ref = hf(full_ids, attention_mask=full_mask, position_ids=positions).logits
        last = model.prefill(cache, ids, attention_mask=mask, chunk=chunk)
        assert cache.host_lengths == [19, 19, 19]
        step = model(nxt, cache=cache)[:, -1]
    assert (last - ref[:, -2]).abs().max().item() < 1e-4
    assert (step - ref[:, -1]).abs().max().item() < 1e-4


def test_prefill_bad_inputs(tmp_path):
    model = convert(hf_model(), tmp_path)
    cache = model.make_cache(1, 8)
    ids = torch.randint(0, 96, (1, 4))
    for chunk in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk"):
            model.prefill(cache, ids, chunk=chunk)
    with pytest.raises(ValueError, match="seq >= 1"):
        model.prefill(cache, ids[:, :0])
    with pytest.raises(ValueError, match="exactly one"):
        model.prefill(cache)
    with torch.no_grad():
        model.prefill(cache, ids, chunk=3)
        with pytest.raises(ValueError, match="empty cache"):
            model.prefill(cache, ids)


def test_dynamic_rope_decode_matches_transformers_cache(tmp_path):
    """Dynamic NTK grows the base with the furthest position of each call, so cached keys keep the rotation of
    their own step: compare step by step with transformers' own cached decoding, past max_position_embeddings."""
    hf = hf_model(**VARIANTS["rope_dynamic"])
    model = convert(hf, tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 28))
    cache = model.make_cache(batch_size=2, max_len=28)
    with torch.no_grad():
        ref = hf(ids[:, :8], use_cache=True)
        past, ref_logits = ref.past_key_values, [ref.logits]
        ours = [model(ids[:, :8], cache=cache)]
        for t in range(8, 28):
            r = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = r.past_key_values
            ref_logits.append(r.logits)
            ours.append(model(ids[:, t:t + 1], cache=cache))
    assert (torch.cat(ours, 1) - torch.cat(ref_logits, 1)).abs().max().item() < 1e-4


def test_input_embeds_equal_ids(tmp_path):
    model = convert(hf_model(), tmp_path)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), model(input_embeds=model.embed(ids)))


def test_bad_inputs(tmp_path):
    model = convert(hf_model(), tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_embeds"):
        model(input_embeds=torch.randn(1, 3, 7))
    cache = model.make_cache(1, 8)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randint(0, 96, (1, 9)), cache=cache)
    with pytest.raises(ValueError, match="left-padded"):
        model(torch.randint(0, 96, (1, 4)), attention_mask=torch.tensor([[1, 0, 1, 0]]))
    with pytest.raises(ValueError, match="batch size"):
        model(torch.randint(0, 96, (2, 4)), cache=cache)
