"""PMI (Tong et al., NeurIPS 2025): per-layer model inversion with class-wise feature modelling
(`inversion/per_layer.py`, `inversion/features.py`) replayed to R-DFCIL's relation-guided student
(`methods/relation.py`)."""

from cl_inversion.methods.relation import RelationGuided


class PMI(RelationGuided):
    default_inversion = "per_layer"
