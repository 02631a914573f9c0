"""vdit: train video diffusion transformers.

The repository keeps the top-level folders model/, data/, train/, eval/, launch/ and conf/;
installed, they are the subpackages ``vdit.model``, ``vdit.data``, ``vdit.train``, ``vdit.eval``,
``vdit.launch`` and ``vdit.conf`` (see ``[tool.setuptools] package-dir`` in pyproject.toml).
"""

__version__ = "0.1.0"
