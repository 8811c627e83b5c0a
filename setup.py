"""Package discovery for the one ``ids_engine`` namespace.

The top-level ``viewer/`` and ``kernels/`` folders are installed as
``ids_engine.viewer`` and ``ids_engine.kernels`` (see docs/architecture.md);
pyproject.toml cannot combine automatic discovery with such a mapping, so it
is done here. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

MAPPED = {"viewer": "ids_engine.viewer", "kernels": "ids_engine.kernels"}

packages = find_packages(include=["ids_engine", "ids_engine.*"])
package_dir = {"ids_engine": "ids_engine"}
for folder, name in MAPPED.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
