"""`python -m pixtral_rt.server`: the same command as `python -m pixtral_rt.serve`."""
from .cli import main

raise SystemExit(main())
