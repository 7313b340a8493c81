"""The pipeline's wiring: its configuration (config), which variants a run makes (planner), the step
functions (steps), the graph written once (step_table) and what runs it (runner in-process, dag_factory
under Airflow, step_cli in a container, launch for pods and containers); the model zoo (zoo, and
zoo_cli its command line) and the checkpoint watch that start runs. No quantization logic lives here."""
