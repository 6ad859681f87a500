"""An HF Llama with left padding under backend="ring", kernel="triton" (interpreter, one process): the
mask the matcher lifts is one mod of kind causal+padding (no parts), whose class proves the key padding,
so the Triton launcher gets per-batch key bounds for it (the padded key tiles are skipped; the tile
counts and the NaN-poisoned keys are checked in tests/kernels/test_triton_padding_skip.py), and the
logits equal the same weights run eagerly in float64 (sdpa: CPU flex has no float64)."""

from __future__ import annotations

import pytest
import torch
from test_models_sharded import build, inputs_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("impl", ["sdpa", "flex_attention"])
def test_left_padded_llama_gets_key_bounds_and_equals_float64(impl, monkeypatch):
    pytest.importorskip("transformers")
    from ringcompile.kernels.triton import launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    original = launch.kv_bounds

    def recording(mask, mask_extras, *args, **kwargs):
        bounds = original(mask, mask_extras, *args, **kwargs)
        seen.append((mask.kind, bool(mask.parts), bounds.tolist()))
        return bounds

    monkeypatch.setattr(launch, "kv_bounds", recording)
    torch._dynamo.reset()
    model = build("llama-pad", impl).double().eval()
    inputs = inputs_for("llama-pad")  # batch row 1: its first 4 tokens are padding
    S = inputs["input_ids"].shape[1]
    options = {"inner": "eager", "kernel": "triton"}
    compiled = torch.compile(model, backend="ring", dynamic=False, options=options)
    reference = build("llama-pad", "sdpa").double().eval()  # eager float64 (CPU flex has no float64)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = compiled(**inputs).logits
        want = reference(**inputs).logits
    torch._dynamo.reset()
    assert seen and all(s == ("causal+padding", False, [[0, S], [4, S]]) for s in seen), seen
    rows = inputs["attention_mask"].bool()  # padded query rows see no key: not compared
    torch.testing.assert_close(got[rows], want[rows], atol=1e-9, rtol=1e-9)
