"""The research workflow around the certification core: the ``dssn`` command and its
pieces. Everything here builds on the core (``dssn_kernels`` one level up), which never
imports this package.

    from dssn_kernels import workflow
    workflow.train("model.pt", dataset="digits", sigma=0.5, epochs=60)
    workflow.certify_dataset("model.pt", "results.tsv")           # resumable
    from dssn_kernels.workflow import analysis
    print(analysis.best_table([analysis.load_result("results.tsv")]))

| module | what it holds |
| --- | --- |
| ``cli`` | the ``dssn`` command (``python -m dssn_kernels``) |
| ``options`` | what the commands share: ``--device``, ``--out`` checks, the user errors (``USER_ERRORS``) |
| ``trainer`` | ``train``: a base classifier under DSSN, independent-SSN or uniform noise (stability training optional) -> checkpoint |
| ``denoiser`` | ``train_denoiser``: a DnCNN in front of a frozen classifier (denoised smoothing) -> checkpoint |
| ``certify_data`` | ``certify_dataset``: a data split -> resumable result TSV (DSSN exactly, or Monte Carlo), sharded under torchrun |
| ``checkpoint`` | checkpoints with their smoothing spec |
| ``models`` | SmallCNN, WideResNet-40-2, ResNet-50, the DnCNN denoiser |
| ``data`` | digits (bundled), CIFAR-10 and ImageNet from local folders |
| ``results`` | the result TSV: format, checks, resume, merge |
| ``analysis`` | certified-accuracy tables and plots |
| ``released`` | result folders of the paper's released code, read by ``analysis`` |
| ``distributed`` | torchrun ranks |
| ``baselines`` | Monte Carlo certification (uniform noise, independent SSN) |
| ``demo`` | the main job on digits |
| ``denoise_demo`` | denoisers against DSSN training on digits (the paper's Appendix D) |
| ``compare_demo`` | the paper's comparison in small on digits: three noises, standard and stability training |
"""
from .certify_data import certify_dataset, results_meta
from .options import USER_ERRORS, WorkflowError, resolve_device
from .trainer import TRAIN_DEFAULTS, train

__all__ = ["TRAIN_DEFAULTS", "USER_ERRORS", "WorkflowError", "certify_dataset", "resolve_device",
           "results_meta", "train"]
