from setuptools import find_packages, setup

setup(
    name="attnreuse",
    version="0.1.0",
    description="Faster diffusion sampling by reusing attention maps across steps, with Triton kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["attnreuse", "attnreuse.*"]),
    package_data={"attnreuse": ["measured.json"],
                  "attnreuse.embedded": ["digits.safetensors", "digits.json", "phast.json"]},
    python_requires=">=3.10",
    # Tested from torch 2.11 with Triton 3.6 (what torch 2.11 brings) to torch 2.13 with Triton 3.9: CI compiles every
    # kernel launch of SD1.5, SD2.1 and SDXL UNets with Triton 3.6 and the newest (tests/test_compiled_launches.py)
    install_requires=["torch>=2.11", "triton>=3.6", "diffusers>=0.30", "numpy", "safetensors", "pillow>=10.1"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "scikit-learn", "scikit-image", "matplotlib", "peft", "DeepCache"],
        "bench": ["pytest-benchmark>=4", "scikit-image", "matplotlib"],
    },
)
