"""PMI (Tong et al., NeurIPS 2025): per-layer model inversion with class-wise feature modelling
(`inversion/per_layer.py`, `inversion/features.py`) replayed to R-DFCIL's relation-guided student
(`methods/relation.py`)."""

from cl_inversion.methods.relation import RelationGuided


class PMI(RelationGuided):
    def __init__(self, *args, inversion: str = "per_layer", **kwargs) -> None:
        super().__init__(*args, inversion=inversion, **kwargs)
