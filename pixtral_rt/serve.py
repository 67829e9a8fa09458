"""`python -m pixtral_rt.serve`: the HTTP server's command line, kept at this name for the command and
scripts; the server lives in pixtral_rt/server/ (cli.py)."""
from .server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
