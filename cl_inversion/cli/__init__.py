"""The command line around `python -m cl_inversion` / `cl-inversion`: what it settles before Hydra starts
(`entry`: the config tree, launchers this machine lacks, older override spellings) and the tally a multirun ends
with (`sweep_summary`, a Hydra callback)."""
