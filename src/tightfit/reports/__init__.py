"""Reports: plots and pages shared by the commands."""
