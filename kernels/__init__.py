"""Triton kernels of pixtral_rt, one op per file. Installed as `pixtral_rt.kernels` (the PyPI name
`kernels` belongs to an unrelated package)."""
