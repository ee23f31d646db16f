"""Prefect flows that schedule the stages described in dvc.yaml."""
