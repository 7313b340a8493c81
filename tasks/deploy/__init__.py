"""Where a step runs in production: the image table, Docker and Kubernetes task specs (launch.py)."""
