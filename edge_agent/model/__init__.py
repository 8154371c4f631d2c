"""The model: bundle format, keys, device profiles, loading and artifact choice, runtimes, pre-
and postprocessing, and the thread/worker plan."""
