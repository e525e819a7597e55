"""What every part of the package uses: errors that reach the user as one line (`errors`), atomic writes and
checkpoint files (`io`), the structured-config schema (`config`) and the checks of a composed config (`validate`),
loggers (`logging_utils`), module helpers (`nn_utils`), intra-op threads per job (`threads`) and a run's
provenance (`provenance`)."""
