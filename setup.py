"""Package discovery only (the rest is pyproject.toml): kernels/ ships as `megalith_kernels`.

setuptools' package-dir maps the folder to that import name; a top-level `kernels` module would
collide with Hugging Face's `kernels` package, which transformers 5 installs.
"""

from setuptools import find_packages, setup

KERNELS = "megalith_kernels"
setup(
    packages=find_packages(include=["megalith", "megalith.*"])
    + [KERNELS] + [f"{KERNELS}.{name}" for name in find_packages("kernels")],
    package_dir={KERNELS: "kernels"},
)
