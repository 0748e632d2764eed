"""Distribution: the MONAI Deploy application (``python -m common.deploy``, SDK operators in
:mod:`common.deploy.operators`), the model-zoo export with the zoo's checks (``python -m common.deploy.export``),
``torch.export`` programs of the networks (``python -m common.deploy.program``) and the hash-checked unpacking of
a downloaded archive (``python -m common.deploy.fetch``).

Nothing is imported here, so the package imports where the MONAI Deploy App SDK is not installed.
"""

__all__: list[str] = []
