"""Distribution: the model-zoo export (``python -m common.deploy.export``).
"""

__all__: list[str] = []
