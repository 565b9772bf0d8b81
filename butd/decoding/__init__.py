"""Caption decoding for any registered captioner (anything with init_state / step over Regions)."""
from __future__ import annotations

from butd.decoding.beam import beam_search
from butd.core.tokens import BOS, EOS, PAD
from butd.decoding.common import next_token_logprobs
from butd.decoding.greedy import greedy_decode
from butd.decoding.options import DecodeOptions, decode
from butd.decoding.result import CaptionResult, DecodeOutput, SampleOutput, to_results
from butd.decoding.sample import sample

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "CaptionResult",
    "DecodeOptions",
    "DecodeOutput",
    "SampleOutput",
    "beam_search",
    "decode",
    "greedy_decode",
    "next_token_logprobs",
    "sample",
    "to_results",
]
