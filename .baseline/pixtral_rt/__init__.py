"""pixtral_rt: a GPU inference runtime for Mistral's Pixtral vision-language models."""

__version__ = "0.1.0"


def _map_kernels() -> None:
    """Bind `pixtral_rt.kernels` to the top-level `kernels/` folder of a source checkout or an editable install.

    That folder has no `__init__.py` on purpose (kernels/README.md): a folder without one is a namespace
    portion, which never wins over a regular package of the same name, so PyPI's `kernels` (imported by
    transformers) is found even when the repository root is on sys.path. setuptools' editable finder does not
    resolve such a folder mapped to a subpackage, so it is bound here, as a package whose __path__ is the
    folder. A wheel copies the files into pixtral_rt/kernels/, where the import system finds them itself."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "pixtral_rt.kernels" in sys.modules:
        return
    src = os.path.join(os.path.dirname(here), "kernels")
    if not os.path.isfile(os.path.join(src, "README.md")):  # not this project's kernels/ folder: bind nothing
        return                                               # (the import then fails, naming pixtral_rt.kernels)
    spec = importlib.machinery.ModuleSpec("pixtral_rt.kernels", None, is_package=True)
    spec.submodule_search_locations = [src]
    mod = importlib.util.module_from_spec(spec)
    mod.__doc__ = "Triton kernels of pixtral_rt, one op per file (the repository's kernels/ folder)."
    sys.modules["pixtral_rt.kernels"] = mod
    setattr(sys.modules[__name__], "kernels", mod)   # as the import system does for a loaded subpackage


_map_kernels()
