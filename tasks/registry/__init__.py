"""Registry stage: MLflow is the system of record (conventions in mlflow/CONVENTIONS.md)."""
