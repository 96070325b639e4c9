"""The pipeline's stages: plain functions with a typed config, runnable and tested without Prefect.

    run_prepare(DataConfig) -> Manifest        stages/prepare.py
"""
