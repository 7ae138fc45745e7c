"""Typed configuration: one pydantic model per section of params.yaml, in one module per stage group
(`data`, `model`, `serving`, `monitoring`), on the loader of `pipelines.config.base`.

Import the module you need (`from pipelines.config.model import TrainConfig`): this package imports
none of them, so that a stage loads, and depends on, only the sections it reads.
"""
