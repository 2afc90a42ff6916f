"""NitroFusion trainer: the shapes dataset, stages 0-3 and the student export (see README "Training")."""
