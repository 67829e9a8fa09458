"""The OpenAI-compatible HTTP server, apart from the engine it drives (no imports here: `--help` must not
load fastapi, uvicorn or torch).

    cli.py                  the command line (`python -m pixtral_rt.serve`, `pixtral-rt-serve`): flags, port, load
    app.py                  the FastAPI app: chat endpoint, errors in OpenAI's shape, streaming, shutdown
    text_endpoints.py       POST /v1/completions, /tokenize, /detokenize
    completion.py           one chat completion's choices (text, stop strings, logprobs, usage)
    text_completion.py      one text completion's choices (several prompts, legacy logprobs)
    metrics.py              Prometheus metrics (/metrics)
    protocol.py             the OpenAI chat request / response types and the parameters refused
    completions_protocol.py the completions / tokenize / detokenize types and their refused parameters
    sampling_protocol.py    the sampling controls both generating routes accept
    sampling_args.py        a request -> one SamplingParams per choice
    http_io.py              body with a size cap, JSON, SSE, client gone, input errors in OpenAI's shape
"""
