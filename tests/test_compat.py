"""kava.model.compat: the KV cache goes to the decoder under the name the installed transformers declares,
and no call of kava's triggers transformers' deprecation warning (with the other name it does)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from kava.model.compat import cache_kwarg
from tiny import tiny_reasoner

FAMILIES = ["llama", "qwen2", "gpt2"]


def _inputs(m, S=5):
    ids = torch.arange(4, 4 + S)[None]
    return m.embed(ids), torch.ones(1, S, dtype=torch.long), torch.arange(S)[None]


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_goes_in_under_the_declared_name_and_is_filled(family):
    m, _ = tiny_reasoner(family)
    name = cache_kwarg(type(m.decoder))
    assert name in inspect.signature(type(m.decoder).forward).parameters
    x, mask, pos = _inputs(m)
    cache = DynamicCache(config=m.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a FutureWarning
        with torch.no_grad():
            m.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 5  # the decoder wrote into our cache (not one of its own)


@pytest.mark.parametrize("family", FAMILIES)
def test_reasoner_run_raises_no_deprecation_and_fills_the_cache(family):
    m, _ = tiny_reasoner(family)
    x, mask, pos = _inputs(m)
    cache = m.new_cache()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = m.run(x, mask, pos, cache)
    assert not [x for x in w if issubclass(x.category, (FutureWarning, DeprecationWarning))], [str(x.message) for x in w]
    assert cache.get_seq_length() == 5 and out.last_hidden_state.shape == (1, 5, m.hidden_size)


def test_the_old_name_is_the_deprecated_one_where_cache_is_declared(monkeypatch):
    """Where the decoder declares `cache` (transformers >= 5.2x), `past_key_values=` is the deprecated name: kava
    passing it would be the FutureWarning the conftest check turns into an error."""
    m, _ = tiny_reasoner("llama")
    if cache_kwarg(type(m.decoder)) != "cache":
        pytest.skip(f"transformers {transformers.__version__} still takes past_key_values")
    monkeypatch.setattr("kava.model.reasoner.cache_kwarg", lambda cls: "past_key_values")
    x, mask, pos = _inputs(m)
    with pytest.raises(FutureWarning, match="past_key_values.*deprecated.*triggered by a call from kava"):
        with torch.no_grad():
            m.run(x, mask, pos, m.new_cache())


def test_a_decoder_without_a_cache_argument_is_refused():
    class NoCache(torch.nn.Module):
        def forward(self, inputs_embeds, attention_mask=None):
            return inputs_embeds

    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(NoCache)
