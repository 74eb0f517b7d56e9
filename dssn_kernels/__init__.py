"""dssn-kernels: exact L1 certificates by Deterministic Smoothing with Splitting Noise.

    import dssn_kernels as dk
    cert = dk.certify(model, x, sigma=0.5, q=255)   # cert.prediction, cert.radius
    dec = dk.certify_at(model, x, 0.1, sigma=0.5)   # dec.certified, early exit

The reference oracle lives in the separate package ``dssn_reference`` (python/).
"""
from .backends import (BackendUnavailableError, NativeExtensionWarning, available_backends,
                       native_extension_error)
from .certify import Certificate, certificate_from_counts, certify, variants
from .drift import LogitDrift, logit_drift
from .early_exit import Decision, Prediction, certify_at, predict
from .smooth import DSSN
from .spec import lam_from_sigma, num_variants, sigma_from_lam, split_offsets
from .noises import NOISES, ssn_noise, uniform_noise
from .training import stability_loss, training_noise

__version__ = "0.1.0"

native_extension_error()  # registers torch.ops.dssn.* when the extension is built

__all__ = [
    "BackendUnavailableError", "Certificate", "DSSN", "Decision", "NOISES",
    "NativeExtensionWarning", "Prediction", "available_backends", "certificate_from_counts",
    "certify", "certify_at", "LogitDrift", "logit_drift",
    "lam_from_sigma", "num_variants", "predict", "sigma_from_lam", "split_offsets",
    "ssn_noise", "stability_loss", "training_noise", "uniform_noise", "variants",
]
