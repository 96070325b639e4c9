"""The pipeline's stages: plain functions with a typed config, runnable and tested without Prefect.

    run_prepare(DataConfig) -> Manifest                                 stages/prepare.py
    resolve_model(ModelConfig) -> ResolvedModel  (the `model` stage)     grpoflow/base_model.py
    run_train(PipelineConfig, train, heldout, model) -> TrainResult     stages/train.py
    run_evaluate(EvalConfig, heldout, {label: model}) -> EvalReport     stages/evaluate.py
    run_export(PipelineConfig, model_dir) -> ExportReport               stages/export.py
    continuous rounds (Rounds, the gate, the row ledger)                stages/continuous.py

stages/dag.py declares which stage needs which and feeds each one the results of those before it
(`run_stage`); the CLI and both Prefect flows run the stages through it. Each result prints itself
as JSON (`as_json()`).
"""
