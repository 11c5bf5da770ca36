"""Generation: sampling (``sampling``), the static decode step and the one-token decoder (``static``), batched
decoding with K steps per CUDA-graph replay (``decoder``), and text in and out (``text``). Every name the rest
of minillm uses is importable from here."""

from minillm.generation.decoder import (
    DECODE_CHUNK,
    PAD,
    Completion,
    StepChunk,
    TokenStep,
    finish_background,
    generate,
    generate_batch,
)
from minillm.generation.sampling import (
    GREEDY_PENALTY,
    SAMPLING_PENALTY,
    Sampling,
    check_sampling,
    default_penalty,
    draw,
    sample_next_token,
)
from minillm.generation.static import (
    MAX_DECODERS,
    GraphedStep,
    StaticDecodeStep,
    _Decoder,
    cache_len,
    decode_dtype,
    decode_mode,
    slide_keep,
    static_decoder,
)
from minillm.generation.text import (
    TextStream,
    check_output,
    check_request,
    complete,
    not_utf8,
    read_prompts,
    render_samples,
)

__all__ = [
    "DECODE_CHUNK", "GREEDY_PENALTY", "MAX_DECODERS", "PAD", "SAMPLING_PENALTY", "Completion", "GraphedStep",
    "Sampling", "StaticDecodeStep", "StepChunk", "TextStream", "TokenStep", "_Decoder", "cache_len", "check_output",
    "check_request", "check_sampling", "complete", "decode_dtype", "decode_mode", "default_penalty", "draw",
    "finish_background", "generate", "generate_batch", "not_utf8", "read_prompts", "render_samples", "sample_next_token", "slide_keep",
    "static_decoder",
]
