"""The pipeline's wiring: its configuration (config), which variants a run makes (planner), the step
functions (steps), the graph written once (step_table) and what runs it (runner in-process, dag_factory
under Airflow, cli's `step` in a container, launch for pods and containers); the model zoo (zoo) and the
checkpoint watch that start runs; cli the command lines (pipeline, zoo, step). No quantization logic lives here."""
