"""Decoding a trained model: the KV cache; one per-row step (`engine.Engine.next_token`: tool calls,
stops) driven by `Engine.generate` (samples of one prompt) and `batch.DecodeBatch` (requests that
come and go); batched sampling (tensor ops, or one Triton kernel); the graphed decoder and its Triton
kernels; the answer's text stream; a server's decoding process. Rule: nothing here imports Ray or an entry-point script.
"""
