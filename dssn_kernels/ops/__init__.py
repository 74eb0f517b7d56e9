"""The two fused ops of the pipeline, one per file: ``expand`` (levels -> split-noise
variants in a workspace) and ``vote`` (logits -> argmax vote counts). Each file holds the
plain-torch implementation and the dispatch to the native kernels (torch.ops.dssn.*)."""
from .expand import expand_into, noise_numerator
from .vote import margin_below, vote_into, vote_margin_into

__all__ = ["expand_into", "margin_below", "noise_numerator", "vote_into", "vote_margin_into"]
