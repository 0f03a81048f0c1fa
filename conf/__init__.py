"""medmeta's Hydra configs, installed as the package ``medmeta.conf``.

This folder is the one copy of the configs: setup.cfg maps it into the package
(``package_dir: medmeta.conf = conf``) and ships its YAML files as package data, so an installed
wheel and an editable install both find them as ``pkg://medmeta.conf`` (what ``medmeta-train``,
``medmeta-evaluate`` and ``experiments/*.py`` use). Add your own folder in front of it with
``--config-dir /my/conf`` or ``hydra.searchpath=[file:///my/conf]`` (docs/experiments.md).
"""
