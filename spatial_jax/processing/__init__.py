"""Image preprocessing and chat templates, equal to the HF processors of each family."""


def for_family(family: str):
    """The processor class (with `from_dir(path)`) of a model family."""
    if family == "qwen2_vl":
        from spatial_jax.processing.qwen2_vl import Qwen2VLPrep
        return Qwen2VLPrep
    if family == "gemma3":
        from spatial_jax.processing.gemma3 import Gemma3Prep
        return Gemma3Prep
    if family == "pixtral":
        from spatial_jax.processing.pixtral import PixtralPrep
        return PixtralPrep
    raise ValueError(f"no processor for model family {family!r}")
