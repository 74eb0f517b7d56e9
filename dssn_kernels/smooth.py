"""The smoothed classifier, in the spirit of Cohen et al.'s ``Smooth``: a base
classifier plus a smoothing spec, with an exact ``predict``, ``certify`` and
``certify_at`` (the last two stop early when the answer is settled: same answers)."""
from __future__ import annotations

import torch

from .backends import check_backend_name
from .certify import Certificate, certify
from .early_exit import Decision, certify_at, predict
from .ops import check_margin
from .pipeline import check_batch_size
from .spec import check_seed, resolve_num_variants


class DSSN:
    """Deterministic Smoothing with Splitting Noise (Levine & Feizi 2021).

    base_classifier maps float32 [N, *shape] in [0, 1] to logits [N, num_classes]. The
    smoothed classifier g(x) is the class most of the L = int(2*lambda*q) split-noise
    variants of x vote for; it is computed exactly, so there is no sampling and no
    abstention.

    ``margin`` (>= 0, default 0): variants whose top logit beats the runner-up by less
    than the margin vote for no class (see ``certify(..., margin=)``).
    """

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma=None,
                 q: int = 255, seed: int = 0, *, lam=None, L=None, batch_size=None,
                 backend: str = "auto", margin=0.0):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        check_backend_name(backend)
        check_seed(seed)
        check_batch_size(batch_size)
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.q = q
        self.seed = seed
        self.num_variants = resolve_num_variants(sigma, lam, q, L)
        self.batch_size = batch_size
        self.backend = backend
        self.margin = check_margin(margin)

    def certify(self, x: torch.Tensor, progress: bool = False) -> Certificate:
        """Prediction and certified L1 radius of every image in the batch x [B, ...]."""
        return certify(self.base_classifier, x, L=self.num_variants, q=self.q, seed=self.seed,
                       margin=self.margin, batch_size=self.batch_size, backend=self.backend,
                       num_classes=self.num_classes, progress=progress)

    def certify_at(self, x: torch.Tensor, radius, **kwargs) -> Decision:
        """Whether every image in the batch x [B, ...] is certified at the L1 ``radius``
        (and its exact prediction), stopping each image early once that is settled: see
        :func:`dssn_kernels.certify_at` (``kwargs``: order, chunk_size,
        settle_prediction)."""
        return certify_at(self.base_classifier, x, radius, L=self.num_variants, q=self.q,
                          seed=self.seed, margin=self.margin, batch_size=self.batch_size,
                          backend=self.backend, num_classes=self.num_classes, **kwargs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed classifier's class for every image in the batch x [B, ...]
        (LongTensor[B]), stopping each image once its leading class cannot be overtaken
        (:func:`dssn_kernels.predict`; same answer as ``certify(x).prediction``)."""
        return predict(self.base_classifier, x, L=self.num_variants, q=self.q, seed=self.seed,
                       margin=self.margin, batch_size=self.batch_size, backend=self.backend,
                       num_classes=self.num_classes).prediction
