"""Celery workers that run segmentation jobs."""
