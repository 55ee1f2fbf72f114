"""The dense call (blindsight.lowering.dense_attention) and the exactly-causal mask check it relies on.

Under torch.compile transformers materializes the causal mask (it cannot prove the prompt unpadded), and SDPA's
fused kernels compute every block of a masked call; a mask that is exactly causal runs as ``is_causal=True``.
"""

import pytest
import torch
import torch.nn.functional as F

from blindsight.lowering import dense_attention
from blindsight.lowering.segments import is_plain_causal


@pytest.mark.parametrize("S", [8, 13, 64])
def test_plain_causal_check_sees_every_entry(S):
    """The check (bool words compared 8 at a time where the rows allow) flips to False for any one entry changed,
    in any head, and reads non-contiguous masks too."""
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    assert is_plain_causal(causal[None, None], 0)
    assert is_plain_causal(causal[None, None].expand(2, 3, S, S), 1)
    assert is_plain_causal(causal.t().contiguous().t()[None, None], 0)  # column-major: compared entry by entry
    unaligned = torch.zeros(S * S + 3, dtype=torch.bool)[3:].view(S, S)  # contiguous, offset not a whole word
    unaligned.copy_(causal)
    assert is_plain_causal(unaligned[None, None], 0)
    g = torch.Generator().manual_seed(S)
    for _ in range(20):
        i, j = torch.randint(S, (2,), generator=g).tolist()
        h = int(torch.randint(3, (1,), generator=g))
        m = causal.repeat(2, 3, 1, 1)
        m[1, h, i, j] = ~m[1, h, i, j]
        assert is_plain_causal(m, 0) and not is_plain_causal(m, 1)
    assert not is_plain_causal(torch.zeros(1, 1, S, S), 0)  # a float mask is never "plain causal"
    assert not is_plain_causal(causal[None, None, : S - 1], 0)  # not square (a decode or chunked call)


def _spy_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is None and kwargs.get("is_causal"))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_materialized_causal_mask_runs_as_is_causal(monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, H, KV, S, D = 2, 4, 2, 40, 16
    q = torch.randn(B, H, S, D, generator=g)
    k, v = (torch.randn(B, KV, S, D, generator=g) for _ in range(2))
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(B, 1, S, S)
    padded = causal.clone()
    padded[1, :, :, :3] = False  # left padding in row 1: not causal, the mask stays
    padded[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded rows keep one key (no NaN)
    refs = [F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3, enable_gqa=True) for m in (causal, padded)]
    calls = _spy_sdpa(monkeypatch)
    outs = [dense_attention(q, k, v, m, 0.3, False) for m in (causal, padded)]
    assert calls == [True, False]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
