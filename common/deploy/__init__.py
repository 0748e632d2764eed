"""Distribution: the model-zoo export (``python -m common.deploy.export``) and the hash-checked unpacking of a
downloaded archive (``python -m common.deploy.fetch``).
"""

__all__: list[str] = []
