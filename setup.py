"""flaxdiff: diffusion and flow models for JAX and Flax Linen."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


setup(
    name="flaxdiff",
    version="0.1.0",
    description="Diffusion and flow models for JAX and Flax Linen: schedules, parameterisations, samplers, models, trainer.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["flaxdiff", "flaxdiff.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["flaxdiff=flaxdiff.cli:main"]},
)
