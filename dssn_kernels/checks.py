"""Argument checks of the public entry points, in one place.

Each ``check_*`` takes what the caller passed and returns the value the code goes on
with (an int, a float, a name...), or raises TypeError/ValueError naming the argument
(``check_known_keys`` and ``check_eval_mode`` only refuse, returning None). The entry
points (``certify``, ``variants``, ``certify_at``, ``predict``, ``DSSN``,
``logit_drift``, ``training_noise``, ``certificate_from_counts`` and the workflow's
Monte Carlo baselines) call them once, before any work; the code below them takes
checked values and does not check again. The images themselves are read by ``inputs.to_levels`` and
the smoothing spec (sigma, lam, L) by ``spec.resolve_num_variants``, which turn them
into what the kernels take; the kernels' own checks of the tensors handed to them
(shape, dtype, device) stay with the kernels (ops/, triton/, csrc/).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
DEFAULT_BATCH_SIZE = 256
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTOCAST_DTYPES = (None, torch.float16, torch.bfloat16)
# The training noises by name (noises.py re-exports it): "dssn" (one DSSN variant per
# image, training.training_noise), "ssn" and "uniform" (noises.ssn_noise, uniform_noise).
NOISES = ("dssn", "ssn", "uniform")

# Layers whose output depends on the rest of the batch in training mode (and, for batch
# norm, that update their running statistics when called).
BATCH_DEPENDENT_IN_TRAINING = (torch.nn.modules.batchnorm._BatchNorm,
                               torch.nn.modules.dropout._DropoutNd)


def check_q(q) -> int:
    """The quantization q: an int >= 1 (pixels are k/q, k = 0..q)."""
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)):
        raise TypeError(f"q must be an int (number of quantization steps), got {type(q).__name__}")
    if q < 1:
        raise ValueError(f"q must be >= 1 (pixels are k/q, k = 0..q), got q={q}")
    return int(q)


def check_seed(seed) -> int:
    """The split seed as an int in 0..2**32-1 (TypeError/ValueError otherwise).

    seed=None would make numpy seed from the OS: offsets (and certificates) that change
    from call to call. The seed is part of the smoothed classifier, so it is required."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in 0..2**32-1, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in 0..2**32-1, got {seed}")
    return int(seed)


def check_margin(margin) -> float:
    """The margin tau as a float: a finite real number >= 0 (0 = no margin)."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number >= 0, got {type(margin).__name__}")
    tau = float(margin)
    if not 0 <= tau < float("inf"):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return tau


def _int_at_least(name: str, value, minimum: int, what: str) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers accepted): a bool or any other
    type is a TypeError, a smaller int a ValueError; both say ``name`` must be ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_batch_size(batch_size) -> int:
    """The forward batch size as an int: a positive integer, DEFAULT_BATCH_SIZE for None
    (TypeError/ValueError as _int_at_least, like q, seed, start and stop)."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    return _int_at_least("batch_size", batch_size, 1, "a positive int")


def check_backend_name(backend) -> str:
    """``backend`` if it is one of BACKENDS, else ValueError (whether it runs on the
    images' device is ``backends.resolve_backend``'s question)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def check_num_classes(num_classes, *, required: bool = False) -> int | None:
    """The number of classes K: an int >= 2, or None (K is whatever the model returns)
    unless ``required`` (None is then a TypeError, as any other type)."""
    if num_classes is None and not required:
        return None
    return _int_at_least("num_classes", num_classes, 2,
                         "an int >= 2" if required else "None or an int >= 2")


def check_chunk_size(chunk_size) -> int | None:
    """Early exit's variants per look: None (planned) or a positive int."""
    if chunk_size is None:
        return None
    return _int_at_least("chunk_size", chunk_size, 1, "None or a positive int")


def check_flag(name: str, value) -> bool:
    """A bool argument (numpy bools accepted), TypeError otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_noise(noise) -> str:
    """A training noise's name: one of NOISES."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {', '.join(NOISES)}; got {noise!r}")
    return noise


def check_model_dtype(dtype) -> torch.dtype:
    """The dtype of the model input: float32, float16 or bfloat16."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def check_autocast(autocast):
    """torch.autocast's dtype for the model, or None (no autocast)."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, "
                         f"got {autocast!r}")
    return autocast


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_KEYS = ("mode", "backend", "options", "fullgraph")


def check_compile(compile):
    """How to compile the base model: None (False, the default: eager), or the keyword
    arguments of ``torch.compile`` as a dict. ``True`` gives ``{}`` (the mode is chosen for
    the device: "reduce-overhead", CUDA graphs, on CUDA, the default mode elsewhere); a
    string is a mode (one of COMPILE_MODES); a dict may hold ``mode``, ``backend`` (e.g.
    "eager", "aot_eager", "inductor"), ``options`` and ``fullgraph``. ``dynamic`` is always
    False: every forward runs at the workspace's one static shape."""
    if compile is None or compile is False or (isinstance(compile, np.bool_) and not compile):
        return None
    if compile is True or isinstance(compile, np.bool_):
        return {}
    if isinstance(compile, str):
        compile = {"mode": compile}
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be a bool, a torch.compile mode string or a dict of "
                        f"torch.compile arguments, got {type(compile).__name__}")
    check_known_keys("compile", compile, COMPILE_KEYS, "torch.compile argument",
                     f"allowed: {', '.join(COMPILE_KEYS)} (dynamic is always False)")
    mode = compile.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode is not None and compile.get("options") is not None:
        raise ValueError("compile: give mode or options, not both (torch.compile refuses both)")
    backend = compile.get("backend")
    if backend is not None and not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"compile backend must be a name or a callable, got {type(backend).__name__}")
    return dict(compile)


def check_known_keys(name: str, options: dict, allowed, kind: str, hint: str) -> None:
    """Refuses the keys of the dict ``options`` (the argument ``name``) outside ``allowed``,
    naming them: "name: unknown kind(s) 'a', 'b'; hint"."""
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown {kind}(s) {', '.join(map(repr, unknown))}; {hint}")


def check_variant_range(start, stop, L: int) -> tuple[int, int]:
    """(start, stop) of ``variants``: ints with 0 <= start <= stop <= L (stop None: L)."""
    stop = L if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= L:
        raise ValueError(f"need 0 <= start <= stop <= L = {L}, got start={start}, stop={stop}")
    return start, stop


def check_generator(generator):
    """A torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def check_counts(counts, name: str = "counts") -> torch.Tensor:
    """Vote counts [B, K] (K >= 2) of non-negative integers, as int64."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, K], got {type(counts).__name__}")
    if counts.dim() != 2 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer [B, K] tensor, got {counts.dtype} "
                         f"of shape {tuple(counts.shape)}")
    if counts.shape[1] < 2:
        raise ValueError(f"{name} need at least 2 classes, got K={counts.shape[1]}")
    counts = counts.long()
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return counts


def check_eval_mode(model) -> None:
    """Refuses a model with a batch-norm or dropout layer in training mode: its votes
    would depend on the batch (and batch norm would update its running statistics during
    certification). Raises ValueError naming the first such module; nothing has run.
    Callables that are not torch.nn.Module are not inspected."""
    if not isinstance(model, torch.nn.Module):
        return
    for path, module in model.named_modules():
        if module.training and isinstance(module, BATCH_DEPENDENT_IN_TRAINING):
            where = f"module {path!r}" if path else "the model itself"
            raise ValueError(
                f"the model is in training mode: {where} ({type(module).__name__}) would make "
                "the votes depend on the batch"
                + (" and update its running statistics"
                   if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) else "")
                + "; call model.eval() first")
