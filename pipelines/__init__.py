"""The `detops` CLI, the stage entry points that dvc.yaml calls, and what every stage shares:
configuration models (`pipelines.config`), detection types (`pipelines.types`) and the offline
environment (`pipelines.environment`)."""
