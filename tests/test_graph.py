"""CUDA-graph decode equals the eager decode step (GPU only)."""
import pytest
import torch

from stablelm import StableLM, preset
from stablelm.graph import GraphDecodeStep


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True)])
def test_graph_decode_matches_eager(overrides):
    cfg = preset("tiny", num_hidden_layers=3, **overrides)
    model = StableLM.random(cfg, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (3, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    caches = [model.make_cache(3, 40) for _ in range(2)]
    with torch.no_grad():
        first = [model(ids, attention_mask=mask, cache=c, last_only=True)[:, -1] for c in caches]
        graph = GraphDecodeStep(model, caches[1])
        tok = first[0].argmax(-1, keepdim=True)
        for _ in range(20):
            eager = model(tok, cache=caches[0], last_only=True)[:, -1]
            replay = graph(tok)
            assert torch.allclose(eager.float(), replay.float(), atol=2e-2, rtol=0), (eager - replay).abs().max()
            tok = eager.argmax(-1, keepdim=True)
    assert caches[0].host_lengths == caches[1].host_lengths == [31, 31, 31]
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    with pytest.raises(ValueError, match="overflow"):
        for _ in range(20):
            graph(tok)
