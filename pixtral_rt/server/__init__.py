"""The OpenAI-compatible HTTP server, apart from the engine it drives (no imports here: `--help` must not
load fastapi, uvicorn or torch).

    cli.py         the command line (`python -m pixtral_rt.serve`, `pixtral-rt-serve`): flags, port, load
    app.py         the FastAPI app: endpoints, errors in OpenAI's shape, streaming, shutdown
    completion.py  one chat completion's choices (text, stop strings, logprobs, usage)
    metrics.py     Prometheus metrics (/metrics)
    protocol.py    the OpenAI request / response types and the parameters refused
"""
