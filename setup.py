from pathlib import Path

from setuptools import setup


def read_requirements(name: str) -> list[str]:
    """Return the requirement lines of a requirements file, without comments."""
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


setup(
    install_requires=read_requirements("requirements.txt"),
    extras_require={"test": read_requirements("requirements-dev.txt")},
)
