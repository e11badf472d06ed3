"""Prefect orchestration of the dalle DAG: `flows.pipeline` (the flow), `flows.serve` (its
scheduled deployment), `flows.tasks` (one task per stage)."""
