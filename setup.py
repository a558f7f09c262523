"""spatial_jax: JAX/Flax mechanistic interpretability of spatial reasoning in VLMs."""
from setuptools import find_packages, setup

# Exact pins: the parity tests compare against transformers 5.23 numerics, and the CI machine
# must resolve the same versions as the developers' machines.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",  # read directly by convert.checkpoint (also an orbax dependency)
    "optax==0.2.8",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "transformers==5.23.0",
    "huggingface_hub==2.4.0",
    "pillow==13.0.0",
    "absl-py==2.5.1",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "jaxtyping==0.3.11",
    # Imported by our code or lazily by transformers on our path (apply_chat_template needs jinja2);
    # torch, a test-only extra, brings jinja2 along, so only a base-only install shows it missing.
    "jinja2==3.1.6",
    "ml_dtypes==0.7.0",
]

setup(
    name="spatial_jax",
    version="0.1.0",
    description="Flax ports of VLMs with explicit intervention points, for spatial-binding interpretability",
    packages=find_packages(include=["spatial_jax", "spatial_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch is only the reference implementation the tests compare against.
        "test": ["torch==2.13.0", "pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2"],
    },
    entry_points={"console_scripts": ["spatial-jax-convert=spatial_jax.convert.cli:run"]},
)
