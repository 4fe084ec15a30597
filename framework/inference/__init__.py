"""Inference on trained runs: load a run, predict, evaluate on labelled data, ensembles, class priors."""
