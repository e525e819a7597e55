from cl_inversion.methods.abd import ABD
from cl_inversion.methods.base import ContinualModule
from cl_inversion.methods.deepinversion import DeepInversion
from cl_inversion.methods.ewc import EWC
from cl_inversion.methods.finetune import Finetune
from cl_inversion.methods.joint import Joint
from cl_inversion.methods.l2 import L2
from cl_inversion.methods.lwf import LwF
from cl_inversion.methods.moe_adapter import MoEAdapter
from cl_inversion.methods.pmi import PMI
from cl_inversion.methods.rdfcil import RDFCIL
from cl_inversion.methods.relation import RelationGuided
from cl_inversion.methods.vdfd import VDFD

__all__ = ["ABD", "ContinualModule", "DeepInversion", "EWC", "Finetune", "Joint", "L2", "LwF", "MoEAdapter", "PMI",
           "RDFCIL", "RelationGuided", "VDFD"]
