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
    install_requires=["torch>=2.4", "triton>=3.0", "diffusers>=0.30", "numpy", "safetensors", "pillow>=10.1"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "scikit-learn", "scikit-image", "matplotlib", "peft", "DeepCache"],
        "bench": ["pytest-benchmark>=4", "scikit-image", "matplotlib"],
    },
)
