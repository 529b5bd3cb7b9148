"""Differences between the transformers versions kava supports (pyproject: `transformers>=5.17,<5.25`).

The decoder forward takes its KV cache as `past_key_values=` up to 5.2x and as `cache=` from the release
that renamed it; the old name still works there but warns ("`past_key_values` is deprecated and will be
removed in version 5.40.0"). kava passes the cache under the name the installed decoder declares.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def cache_kwarg(decoder_cls: type) -> str:
    """The keyword under which `decoder_cls.forward` takes the KV cache: "cache" or "past_key_values".

    Read from the forward signature (transformers' deprecation decorator keeps the wrapped signature), once
    per decoder class.
    """
    params = inspect.signature(decoder_cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{decoder_cls.__name__}.forward takes neither `cache` nor `past_key_values`; "
                    "kava needs a decoder with a KV cache argument")
