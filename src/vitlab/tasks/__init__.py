"""Tasks built on any backbone through the contract.

Inference with a trained classifier (:class:`vitlab.ViTClassifier`) lives in :mod:`vitlab.deploy`.
"""

__all__: list[str] = []
