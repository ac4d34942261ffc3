"""Fast, exact kernels for CURE (Conserve-Update-Revise adversarial training, ICLR 2024).

>>> import cure_kernels as ck
>>> stats = ck.rgp_mask_(updates, grads_nat, grads_adv, alpha=0.1, p=0.3)
>>> ck.revise_(revision_params, params, decay=0.999)
"""

from cure_kernels.backends import BACKENDS
from cure_kernels.ops import MaskStats, available_backends, revise_, rgp_mask_
from cure_kernels.prominence import ProminenceMasker
from cure_kernels.select import rgp_select
from cure_kernels.sgd_step import rgp_sgd_step_

__all__ = ["BACKENDS", "MaskStats", "ProminenceMasker", "available_backends", "revise_", "rgp_mask_",
           "rgp_select", "rgp_sgd_step_"]
__version__ = "0.1.0"
