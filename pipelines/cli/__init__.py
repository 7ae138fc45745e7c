"""`detops`: one verb per lifecycle stage, in one module per stage group (`data`, `model`,
`registry`, `serving`, `monitoring`); `pipelines.cli.main` assembles them.

dvc.yaml calls these verbs; people do too. Each verb reads its own section of params.yaml and lets
options override inputs and outputs. Heavy libraries are imported inside the verbs, so that
`detops --help` stays fast and a stage imports (and dvc.yaml lists) only the code of its own verb.
"""
