"""Serving core: continuous batching over a paged KV cache.

    sequence.py      one request's state (tokens, pages, sampling, outputs)
    kv_pages.py      the page allocator with reference counts and the prefix cache (hash-chained pages)
    scheduler.py     waiting / running queues; decides on the host, once per step, what runs
    model_runner.py  runs a step on the device: vision, chunked prefill, batched decode (CUDA graphs)
    llm_engine.py    the step loop in its own thread; submit / cancel / metrics for the HTTP side and the CLI
    detokenize.py    token ids -> text pieces, stop strings (consumer side, never in the step loop)
"""
