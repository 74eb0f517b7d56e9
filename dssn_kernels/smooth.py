"""The smoothed classifier, in the spirit of Cohen et al.'s ``Smooth``: a base
classifier plus a smoothing spec, with an exact ``predict``, ``certify`` and
``certify_at`` (the last two stop early when the answer is settled: same answers)."""
from __future__ import annotations

import torch

from . import checks
from .certify import Certificate, Smoothing, run_certify
from .early_exit import Decision, run_certify_at, run_predict


class DSSN:
    """Deterministic Smoothing with Splitting Noise (Levine & Feizi 2021).

    base_classifier maps float32 [N, *shape] in [0, 1] to logits [N, num_classes]. The
    smoothed classifier g(x) is the class most of the L = int(2*lambda*q) split-noise
    variants of x vote for; it is computed exactly, so there is no sampling and no
    abstention.

    ``margin`` (>= 0, default 0): variants whose top logit beats the runner-up by less
    than the margin vote for no class (see ``certify(..., margin=)``). ``compile``
    (False), ``autocast`` (None): how the base classifier runs, as in ``certify``; the
    compiled model is cached for the life of the base classifier, so every call at the
    same batch size compiles nothing new.
    """

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma=None,
                 q: int = 255, seed: int = 0, *, lam=None, L=None, batch_size=None,
                 backend: str = "auto", margin=0.0, compile=False, autocast=None):
        # checked once, here: the methods run with these values
        self.smoothing = Smoothing.checked(
            sigma=sigma, lam=lam, L=L, q=q, seed=seed, margin=margin, batch_size=batch_size,
            backend=backend, num_classes=num_classes, require_num_classes=True)
        self.base_classifier = base_classifier
        self._call = dict(compile=checks.check_compile(compile),
                          autocast=checks.check_autocast(autocast))

    # the checked parameters, read-only (a new spec is a new DSSN)
    num_classes = property(lambda self: self.smoothing.num_classes)
    q = property(lambda self: self.smoothing.q)
    seed = property(lambda self: self.smoothing.seed)
    num_variants = property(lambda self: self.smoothing.L, doc="L")
    batch_size = property(lambda self: self.smoothing.batch_size)
    backend = property(lambda self: self.smoothing.backend)
    margin = property(lambda self: self.smoothing.margin)

    def certify(self, x: torch.Tensor, progress: bool = False) -> Certificate:
        """Prediction and certified L1 radius of every image in the batch x [B, ...]."""
        return run_certify(self.base_classifier, x, self.smoothing, progress=progress,
                           **self._call)

    def certify_at(self, x: torch.Tensor, radius, **kwargs) -> Decision:
        """Whether every image in the batch x [B, ...] is certified at the L1 ``radius``
        (and its exact prediction), stopping each image early once that is settled: see
        :func:`dssn_kernels.certify_at` (``kwargs``: order, chunk_size,
        settle_prediction)."""
        return run_certify_at(self.base_classifier, x, radius, self.smoothing,
                              **{**self._call, **kwargs})

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed classifier's class for every image in the batch x [B, ...]
        (LongTensor[B]), stopping each image once its leading class cannot be overtaken
        (:func:`dssn_kernels.predict`; same answer as ``certify(x).prediction``)."""
        return run_predict(self.base_classifier, x, self.smoothing, **self._call).prediction
