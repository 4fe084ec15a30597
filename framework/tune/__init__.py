"""`recipe tune`: a hyper-parameter search on Optuna over a recipe's `tune:` space, shared by any number of worker
processes and machines through one storage. `plan` checks and opens (section, space, metric, storage, study),
`study` is the worker loop (trials, pruning, heartbeats, retries), `report` writes the sheet and best.yaml."""
