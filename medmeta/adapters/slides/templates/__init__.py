"""Submission templates (copied next to a model by ``visiomel.export_submission``)."""
