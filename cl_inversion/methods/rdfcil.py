"""R-DFCIL (Gao et al., ECCV 2022): a fresh generator per task (the `rdfcil_generator` engine: 5k steps,
batch 128, τ=1000, smoothness 1e-3, BN-KL 50) replayed to the relation-guided student."""

from cl_inversion.methods.relation import RelationGuided


class RDFCIL(RelationGuided):
    """R-DFCIL's student as `RelationGuided` states it; conf/method/rdfcil.yaml pairs it with `rdfcil_generator`."""
