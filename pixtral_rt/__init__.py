"""pixtral_rt: a GPU inference runtime for Mistral's Pixtral vision-language models."""

__version__ = "0.1.0"


def _map_kernels() -> None:
    """The Triton kernels live in the top-level `kernels/` folder and are installed as `pixtral_rt.kernels`
    (a wheel copies them there). In a source checkout, or an editable install whose finder does not map
    package_dir (older setuptools' `develop`), bind `pixtral_rt.kernels` to that folder explicitly."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "pixtral_rt.kernels" in sys.modules:
        return
    src = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return  # installed normally: the import system (or the editable finder) knows where it is
    spec = importlib.util.spec_from_file_location("pixtral_rt.kernels", init, submodule_search_locations=[src])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pixtral_rt.kernels"] = mod
    spec.loader.exec_module(mod)


_map_kernels()
