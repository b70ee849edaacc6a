"""Mixture of experts (issue 21): a router, experts, token dispatch and the MoE MLP that replaces the dense MLP.

config.py checks the MoE flags and says which layers are MoE; router.py chooses experts and computes the
balancing losses; experts.py holds every expert's weights stacked; dispatch.py moves tokens to their experts
and back; layer.py puts them together.
"""

from megalith.models.moe.config import check_moe, moe_layer_pattern
from megalith.models.moe.layer import MoELayer, set_aux_loss_scale
from megalith.models.moe.router import update_expert_biases

__all__ = ["MoELayer", "check_moe", "moe_layer_pattern", "set_aux_loss_scale", "update_expert_biases"]
