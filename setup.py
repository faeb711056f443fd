from setuptools import find_packages, setup

setup(
    name="stablelm",
    version="0.1.0",
    description="From-scratch PyTorch + Triton StableLM decoder, Triton kernels and a radiology report model",
    packages=find_packages(include=["stablelm", "stablelm.*", "kernels", "kernels.*", "vision", "vision.*",
                                    "bench", "bench.*"]),
    py_modules=["convert_weights"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton==3.6.0",  # pinned to what the GPU machine runs (the kernels are tuned and tested on it)
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "numpy",
        "tqdm",
        "jinja2>=3.1",
        "pillow",
    ],
    extras_require={
        # transformers pinned to what the GPU machine runs, so the parity tests compare against one version.
        # pycocoevalcap: the reference METEOR (Meteor 1.5 jar, run with Java) and the oracle for the metric tests.
        "test": ["pytest>=8", "transformers==5.17.0", "protobuf", "pycocoevalcap"],
    },
)
