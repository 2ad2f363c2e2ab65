"""Inference for the plain models: incremental decoding with caches, and sampling.

    from megams.inference import make_decoder, generate
    dec = make_decoder(model)                 # model.eval(); every model type, cached
    logits = dec.step(tokens)                 # one position: tokens [B] -> logits [B, V]
    out = generate(model, prompt_ids, 100, temperature=0.8, top_k=50, top_p=0.95, seed=0)

The models' training forward is untouched: the decoders reuse their modules and weights
(`kv.py`: attention steps and caches, `streams.py`: blocks / shortening / upsampling one position at
a time, `decoders.py`: the four models, `sampling.py`: temperature / top-k / top-p and the loop).
"""
from megams.inference.decoders import RecomputeDecoder, make_decoder
from megams.inference.sampling import generate, sample_next

__all__ = ["make_decoder", "RecomputeDecoder", "generate", "sample_next"]
