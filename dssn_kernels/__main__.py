"""``python -m dssn_kernels`` (and ``torchrun -m dssn_kernels``): the ``dssn`` command."""
import sys

from .workflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
