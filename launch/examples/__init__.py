"""Shipped examples of user code plugged in by import path (model.name / data.name), with configs in configs/."""
