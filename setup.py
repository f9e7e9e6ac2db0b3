"""pip front end. Metadata lives in pyproject.toml; this file maps the package layout
(``kernels/`` installs as ``oneref.kernels``)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["oneref", "oneref.*"]) + ["oneref.kernels"],
    package_dir={"oneref.kernels": "kernels"},
)
